"""Model-family registry: detection, lookups and loading errors."""

import json
import sys

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.methods import METHODS, lora_targets
from alpaca_cot.models import FAMILIES, detect_family, get_family, load_model, resolve_family, resolve_model_path


def test_llama_is_detected_from_config_json(tiny_llama):
    assert resolve_family(None, str(tiny_llama)).name == "llama"
    assert detect_family({"model_type": "llama"}, "x").name == "llama"


def test_undetectable_family_asks_for_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(UserError, match=r"model_type 'mystery'.*pass --model_type"):
        resolve_family(None, str(tmp_path))


def test_unknown_model_type_is_named():
    with pytest.raises(UserError, match=r"--model_type: unknown model type 'lama' \(did you mean 'llama'\?\)"):
        get_family("lama")


def test_nonexistent_model_path():
    with pytest.raises(UserError, match=r"./no/such/model does not exist"):
        resolve_model_path("./no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_ids_pass_through_unresolved():
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_registry_rows_are_complete():
    from alpaca_cot.templates import TEMPLATES

    for name, family in FAMILIES.items():
        assert family.name == name and family.config_model_types and family.lora_targets
        assert family.template in TEMPLATES and (family.own_template is None or family.own_template in TEMPLATES)
        assert family.pad_fallback in ("unk", "eos")
    for name, method in METHODS.items():
        assert method.name == name and method.description


def test_lora_targets_the_model_lacks_are_listed(tiny_llama):
    import argparse

    import torch

    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.float32)
    args = argparse.Namespace(lora_target_modules=["query_key_value"])
    with pytest.raises(UserError, match=r"query_key_value not in this model; its Linear layers are: .*q_proj"):
        lora_targets(args, FAMILIES["llama"], model)
    assert lora_targets(argparse.Namespace(lora_target_modules=None), FAMILIES["llama"], model) == ["q_proj", "v_proj"]
    assert lora_targets(argparse.Namespace(lora_target_modules=["all"]), FAMILIES["llama"], model) == "all-linear"


# --- Remote-code families: detection from config.json, opt-in, quantization ---

CHATGLM6B = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "position_encoding_2d": True}
CHATGLM2 = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "multi_query_attention": True}


@pytest.mark.parametrize("config, path, family", [
    (CHATGLM6B, "THUDM/chatglm-6b", "chatglm"),
    (CHATGLM2, "THUDM/chatglm2-6b", "chatglm2"),
    (CHATGLM2, "THUDM/chatglm3-6b", "chatglm3"),  # same config as ChatGLM2: told by its name
    ({**CHATGLM2, "_name_or_path": "THUDM/chatglm3-6b-32k"}, "./local", "chatglm3"),
    ({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"]}, "x", "baichuan"),
    ({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "vocab_size": 125696}, "x", "baichuan2"),
    ({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "vocab_size": 64000}, "x", "baichuan"),
    ({"architectures": ["BaiChuanForCausalLM"]}, "x", "baichuan"),  # no model_type: by architecture
    ({"model_type": "moss"}, "x", "moss"),
    ({"model_type": "internlm"}, "x", "internlm"),
    ({"model_type": "internlm2"}, "x", "internlm2"),
])
def test_remote_code_families_are_told_apart_by_config_json(config, path, family):
    assert detect_family(config, path).name == family


def test_chatglm_config_without_either_generation_marker_asks_for_model_type():
    with pytest.raises(UserError, match=r"model_type 'chatglm'.*pass --model_type"):
        detect_family({"model_type": "chatglm"}, "x")


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory):
    """The real ChatGLM2 checkpoint files without weights: refusal must come before anything loads."""
    from tests.real_checkpoints import REAL_CODE, copy_real_files

    if not REAL_CODE.is_dir():
        pytest.skip(f"{REAL_CODE} (real upstream code and tokenizers) is not present")
    return copy_real_files("chatglm2", tmp_path_factory.mktemp("refuse-chatglm2-"))


def _no_code_of_the_refused_checkpoint_imported():
    return not any("refuse" in name for name in sys.modules)  # its dynamic modules would be named after it


def test_training_a_remote_code_family_needs_the_flag(remote_folder, tmp_path, sample_file, capsys):
    import uniform_finetune

    code = uniform_finetune.main(["--model_name_or_path", str(remote_folder), "--data", str(sample_file),
                                  "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "chatglm2 models run Python code shipped inside the checkpoint" in err[0]
    assert "pass --trust_remote_code to allow it" in err[0]
    assert not (tmp_path / "out").exists() and _no_code_of_the_refused_checkpoint_imported()


def test_every_inference_script_refuses_remote_code_without_the_flag(remote_folder, tmp_path, capsys):
    """generate, predict and merge via main(); server and web load through the same load_from_args."""
    import argparse

    import generate
    import merge
    import predict
    from alpaca_cot.infer.loading import load_from_args

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "hi", "input": "", "output": ""}]))
    adapter = tmp_path / "adapter"  # a plain PEFT adapter folder naming the remote base
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(remote_folder)}))
    base = ["--model_name_or_path", str(remote_folder)]
    assert generate.main([*base, "--instruction", "hi"]) == 2
    assert predict.main([*base, "--data", str(data), "--result_dir", str(tmp_path / "out.jsonl")]) == 2
    assert merge.main(["--lora_dir", str(adapter), "--merged_dir", str(tmp_path / "merged")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("pass --trust_remote_code" in line for line in errors)
    served = argparse.Namespace(lora_dir=None, model_name_or_path=str(remote_folder), model_type=None,
                                template=None, trust_remote_code=False)
    with pytest.raises(UserError, match="pass --trust_remote_code"):
        load_from_args(served)
    assert _no_code_of_the_refused_checkpoint_imported()


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), pytest.param(8, "Linear8bitLt", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["chatglm2", "baichuan", *(pytest.param(name, marks=pytest.mark.slow) for name in
                                                        ["chatglm", "chatglm3", "moss", "internlm", "internlm2",
                                                         "baichuan2"])])
def test_quantization_applies_to_remote_code_models(name, bits, layer, tmp_path):
    import torch

    from alpaca_cot.methods import upstream_names_in_model
    from alpaca_cot.models import linear_module_names
    from tests.real_checkpoints import REAL_CODE, build_real_checkpoint

    pytest.importorskip("bitsandbytes")
    if not REAL_CODE.is_dir():
        pytest.skip(f"{REAL_CODE} (real upstream code and tokenizers) is not present")
    folder = build_real_checkpoint(name, tmp_path / f"tiny-{name}")
    model = load_model(str(folder), FAMILIES[name], torch.float32, bits, trust_remote_code=True)
    quantized = {full.rsplit(".", 1)[-1] for full, module in model.named_modules() if type(module).__name__ == layer}
    targets = upstream_names_in_model(FAMILIES[name], model, list(FAMILIES[name].lora_targets))
    assert set(targets) <= quantized <= set(linear_module_names(model))


@pytest.mark.parametrize("name, pad", [("moss", "<eom>"), ("internlm", "</s>"), ("baichuan2", "<unk>")])
def test_missing_pad_token_is_filled_per_family_and_pads_are_never_learned(name, pad, tmp_path):
    from transformers import DataCollatorForSeq2Seq

    from alpaca_cot.data import IGNORE_INDEX, special_prefix_ids, tokenize_record
    from alpaca_cot.models import load_tokenizer, resolve_template
    from tests.real_checkpoints import REAL_CODE, copy_real_files

    if not REAL_CODE.is_dir():
        pytest.skip(f"{REAL_CODE} (real upstream code and tokenizers) is not present")
    family = FAMILIES[name]
    tokenizer = load_tokenizer(str(copy_real_files(name, tmp_path / name)), family, trust_remote_code=True)
    assert tokenizer.pad_token == pad  # MOSS (EOS <eom>) and InternLM ship none: EOS; Baichuan2 ships <unk>
    tokenizer.padding_side = "right"  # as training sets it
    template = resolve_template(None, family)
    short, long = ({"instruction": "hi", "input": "", "output": text} for text in ("a", "a longer answer"))
    examples = [tokenize_record(r, tokenizer, template, 512, special_prefix_ids(tokenizer)) for r in (short, long)]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(examples)
    width = len(examples[0]["input_ids"])
    assert batch["attention_mask"][0, width:].sum() == 0 and (batch["labels"][0, width:] == IGNORE_INDEX).all()
    assert batch["labels"][0, width - 1] == tokenizer.eos_token_id  # the answer's own EOS is learned


def test_output_head_gets_a_contiguous_input_for_the_last_position(tiny_llama):
    """torch's CPU bf16 matmul expands the head's weight per row for a strided slice: load_model hands it a copy."""
    import torch

    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.bfloat16)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 13], [1, 7, 8, 2]]), logits_to_keep=1).logits
    assert logits.shape[:2] == (2, 1) and seen == [True]


def test_a_non_finite_weight_stops_training_with_one_line_naming_it(tiny_llama, tmp_path, sample_file, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import uniform_finetune

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    code = uniform_finetune.main(["--model_name_or_path", str(broken), "--data", str(sample_file), "--output_dir",
                                  str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1",
                                  "--heldout_eval", "0", "--val_set_size", "0"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "weight model.layers.1.mlp.down_proj.weight holds 2 non-finite value(s)" in err[0]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert torch.isfinite(load_file(tiny_llama / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]).all()


def test_a_non_finite_buffer_is_named(tiny_llama):
    import torch

    from alpaca_cot.models import check_finite_tensors

    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.float32)
    check_finite_tensors(model, "ok")  # a sound checkpoint passes
    model.model.rotary_emb.inv_freq[1] = float("nan")
    with pytest.raises(UserError, match=r"buffer model.rotary_emb.inv_freq holds 1 non-finite"):
        check_finite_tensors(model, str(tiny_llama))


def test_an_adapter_of_another_base_is_one_line(tiny_run, tiny_llama_wide, capsys):
    import generate

    code = generate.main(["--lora_dir", str(tiny_run), "--model_name_or_path", str(tiny_llama_wide),
                          "--instruction", "hi", "--max_new_tokens", "2"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"the adapter in {tiny_run} does not fit the base model {tiny_llama_wide}" in errors[0]
    assert "trained on another base model" in errors[0]
