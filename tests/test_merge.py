"""`python -m finetune.merge`: the merged standalone checkpoint computes what base + adapter computes."""
import json

import pytest
import torch
from PIL import Image

from finetune.merge import main as merge_main
from mmchat.conversation import Message, render
from mmchat.image import preprocess
from mmchat.model import LoadOptions, load_model
from mmchat.templates import get_template
from tiny_models import COLOURS, one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def logits(model, image: Image.Image) -> torch.Tensor:
    """Last-position logits [V] for "What colour is it?" about `image`."""
    r = render([Message("user", "What colour is it?", 1)], get_template(model.config.template), model.tokenizer,
               model.image_tokens, add_generation_prompt=True)
    with torch.no_grad():
        feats = model.encode_images(preprocess(image, model.config.vision).unsqueeze(0))
        embeds = model.embed(torch.tensor([r.input_ids]), torch.tensor([r.image_mask]), feats)
        return model.llm(inputs_embeds=embeds).logits[0, -1]


def test_merged_checkpoint_equals_base_plus_adapter(qlora_run, tmp_path):
    out = tmp_path / "merged"
    assert merge_main(["--model", str(qlora_run.output), "--out", str(out), "--dtype", "fp32"]) == 0
    config = json.loads((out / "mmchat.json").read_text())
    assert (config["llm"], config["tokenizer"], config["adapter"]) == ("llm", "llm", None)
    assert (out / "llm" / "model.safetensors").is_file() and not (out / "adapter").exists()
    with_adapter = load_model(qlora_run.output, LoadOptions("32bit", "cpu"))  # the base un-quantised + adapter
    merged = load_model(out, LoadOptions("32bit", "cpu"))
    assert not any("lora" in name for name, _ in merged.llm.named_parameters())
    for colour in ("red", "blue"):
        image = Image.new("RGB", (40, 30), COLOURS[colour])
        a, b = logits(with_adapter, image), logits(merged, image)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert int(b.argmax()) == merged.tokenizer.convert_tokens_to_ids("▁" + colour)


def test_merge_explains_what_it_cannot_do(tiny_checkpoint, qlora_run, tmp_path, capsys):
    assert merge_main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "m")]) == 2
    assert "has no LoRA adapter to merge" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert merge_main(["--model", str(qlora_run.output), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'taken'} exists" in err and "--force" in err
