"""merge.py: folded weights equal base + adapter, reload in plain transformers, clear refusals."""

import pytest
import torch

import merge
from tests.conftest import train_tiny


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 17, 33, 2]])).logits


LINEAR_METHODS = {
    "lora": ["--peft_type", "lora", "--lora_target_modules", "all"],
    "dora": ["--peft_type", "lora", "--use_dora"],
    "rslora": ["--peft_type", "lora", "--use_rslora"],
    "adalora": ["--peft_type", "adalora", "--lora_target_modules", "all"],
    "ia3": ["--peft_type", "ia3"],
}


@pytest.mark.parametrize("method", [pytest.param(method, marks=pytest.mark.slow)
                                    if method in ("dora", "rslora", "adalora") else method
                                    for method in LINEAR_METHODS])
def test_merged_model_matches_base_plus_adapter(method, tiny_llama, sample_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, merged = tmp_path / "run", tmp_path / "merged"
    assert train_tiny(tiny_llama, sample_file, run, *LINEAR_METHODS[method], "--max_steps", "3",
                      "--learning_rate", "5e-2") == 0
    assert merge.main(["--lora_dir", str(run), "--merged_dir", str(merged)]) == 0
    assert f"merged model saved to {merged} (check: max logit difference" in capsys.readouterr().out
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no peft
    assert torch.allclose(_logits(plain), _logits(adapted), atol=1e-4)
    assert not torch.allclose(_logits(plain), _logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval()),
                              atol=1e-4)  # the adapter really changed something
    assert AutoTokenizer.from_pretrained(merged).eos_token == "</s>"  # the tokenizer travels along


def test_qlora_run_merges_into_a_full_precision_base(tiny_llama_wide, sample_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    run, merged = tmp_path / "run", tmp_path / "merged"
    assert train_tiny(tiny_llama_wide, sample_file, run, "--quantization_bit", "4", "--max_steps", "2") == 0
    assert merge.main(["--lora_dir", str(run), "--merged_dir", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.isfinite(_logits(model)).all()


def test_prompt_learning_adapters_are_refused(tiny_llama, sample_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_tiny(tiny_llama, sample_file, run, "--peft_type", "prompt", "--max_steps", "1",
                      "--num_virtual_tokens", "4") == 0
    assert merge.main(["--lora_dir", str(run), "--merged_dir", str(tmp_path / "m")]) == 2
    assert "cannot be folded into the base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_existing_output_folder_is_never_overwritten(tiny_llama, sample_file, tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    merged.mkdir()
    (merged / "keep.txt").write_text("mine")
    assert train_tiny(tiny_llama, sample_file, run, "--max_steps", "1") == 0
    assert merge.main(["--lora_dir", str(run), "--merged_dir", str(merged)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (merged / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_merged_model_can_be_fine_tuned_again(tiny_llama, sample_file, tmp_path):
    run, merged, again = tmp_path / "run", tmp_path / "merged", tmp_path / "again"
    assert train_tiny(tiny_llama, sample_file, run, "--max_steps", "1") == 0
    assert merge.main(["--lora_dir", str(run), "--merged_dir", str(merged)]) == 0
    assert train_tiny(merged, sample_file, again, "--max_steps", "1") == 0
    assert (again / "adapter_model.safetensors").is_file()


def test_a_merge_that_changes_the_answers_is_refused(tiny_llama, sample_file, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    run, merged = tmp_path / "run", tmp_path / "merged"
    assert train_tiny(tiny_llama, sample_file, run, "--max_steps", "2", "--learning_rate", "1e-2") == 0
    # A broken merge (here: one that drops the adapter) must fail loudly and save nothing.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
    with pytest.raises(RuntimeError, match="merged model disagrees with base \\+ adapter"):
        merge.main(["--lora_dir", str(run), "--merged_dir", str(merged)])
    assert not merged.exists()
