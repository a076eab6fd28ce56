"""The record templates of each lab domain, and the seeded stream they draw from.

One module per domain (clinical, legal, finance) holds its document kinds; ``general`` holds the
prose only the pre-training corpus carries. ``fedlora_lab.datagen`` turns them into site data.
"""

from typing import Final, Literal, get_args

from fedlora_lab.templates import clinical, finance, legal
from fedlora_lab.templates.draw import DomainStyle, Draw, Person, derive_seed
from fedlora_lab.templates.general import GENERAL

__all__ = ["DOMAINS", "GENERAL", "STYLES", "Domain", "DomainStyle", "Draw", "Person", "derive_seed"]

Domain = Literal["clinical", "legal", "finance"]
DOMAINS: Final[tuple[Domain, ...]] = get_args(Domain)
STYLES: Final[dict[Domain, DomainStyle]] = {"clinical": clinical.STYLE, "legal": legal.STYLE, "finance": finance.STYLE}
