import sys

from fedlora_lab.cli import main

sys.exit(main())
