"""`fedlora-lab merge`: the adapter folded into its base gives the adapted model's logits without peft;
a base and adapter that do not fit, an adapter that is not one, or an occupied output are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedlora_lab.cli import main
from fedlora_lab.model_factory import MadeModel
from tests.server.statedir import files_of


def _save_adapter(
    model: torch.nn.Module, out: Path, targets: str | list[str] = "all-linear", *, conv1d: bool = False
) -> Path:
    """A LoRA adapter of `model` with A and B both random (B = 0, peft's default, would change nothing)."""
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=conv1d)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(lab_model: MadeModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(AutoModelForCausalLM.from_pretrained(lab_model.path), tmp_path_factory.mktemp("adapter"))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_the_merged_model_loads_without_peft_and_gives_the_adapted_models_logits(
    lab_model: MadeModel, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a few inputs, of different lengths and tokens.
    out = tmp_path / "merged"
    inputs = [
        torch.arange(1, 17).unsqueeze(0),
        torch.tensor([[5, 9, 200, 3, 77, 410, 12]]),
        torch.randint(3, 512, (2, 30)),
    ]

    # Execute
    code = main(["merge", "--base", str(lab_model.path), "--adapter", str(adapter), "--out", str(out)])

    # Assert
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"{out}: {adapter} merged into {lab_model.path} (14 modules, ")
    assert "with the base's tokenizer" in captured.out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab_model.path), adapter)
    base = AutoModelForCausalLM.from_pretrained(lab_model.path)
    for ids in inputs:
        torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), atol=1e-5, rtol=0)
        assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-3)  # the adapter counted
    text = "the merged model's tokenizer"
    assert (
        AutoTokenizer.from_pretrained(out)(text).input_ids
        == AutoTokenizer.from_pretrained(lab_model.path)(text).input_ids
    )


def _narrower_llama(out: Path) -> Path:
    """An adapter for a Llama with the lab model's module names at another width."""
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    return _save_adapter(LlamaForCausalLM(config), out)


def _gpt2(out: Path) -> Path:
    """An adapter for another family: its modules (c_attn, c_fc) are not the base's."""
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    return _save_adapter(GPT2LMHeadModel(config), out, targets=["c_attn", "c_fc"], conv1d=True)


def _empty(out: Path) -> Path:
    out.mkdir()
    return out


REFUSALS = {
    "adapter of another width": (_narrower_llama, "does not fit --base"),
    "adapter of another family": (_gpt2, "does not fit --base"),
    "empty directory as adapter": (_empty, "not a peft adapter directory (no adapter_config.json)"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_an_adapter_that_does_not_fit_the_base_is_refused_in_one_line(
    lab_model: MadeModel, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, named = REFUSALS[case]
    adapter = make(tmp_path / "adapter")
    out = tmp_path / "merged"

    code = main(["merge", "--base", str(lab_model.path), "--adapter", str(adapter), "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert err.startswith(f"fedlora-lab merge: error: --adapter {adapter}")
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no model, no half-written one beside


def test_a_whole_model_given_as_adapter_is_refused_saying_what_it_is(
    lab_model: MadeModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["merge", "--base", str(lab_model.path), "--adapter", str(lab_model.path), "--out", str(tmp_path / "m")]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"fedlora-lab merge: error: --adapter {lab_model.path}: not a peft adapter directory "
        "(no adapter_config.json) (it holds a whole model: load it with AutoModelForCausalLM)\n"
    )
    assert not (tmp_path / "m").exists()


def test_a_merge_never_writes_into_a_directory_that_holds_anything(
    lab_model: MadeModel, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = files_of(tmp_path)

    code = main(["merge", "--base", str(lab_model.path), "--adapter", str(adapter), "--out", str(out)])

    assert code == 2
    assert capsys.readouterr().err == (
        f"fedlora-lab merge: error: --out {out}: exists and is not empty; a merge never overwrites\n"
    )
    assert files_of(tmp_path) == before


def test_a_base_that_is_not_a_model_directory_is_refused_in_one_line(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["merge", "--base", str(adapter), "--adapter", str(adapter), "--out", str(tmp_path / "m")])

    assert code == 2
    assert (
        capsys.readouterr().err
        == f"fedlora-lab merge: error: --base {adapter}: not a model directory (no config.json)\n"
    )
    assert not (tmp_path / "m").exists()
