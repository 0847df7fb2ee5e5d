"""Reference relevances computed by ``lxt``'s own AttnLRP code (run as a subprocess by
``tests/test_attribution_lrp.py``, because lxt patches transformers' classes globally and irreversibly).

``lxt`` 2.1 cannot be used as is under transformers 5: ``import lxt.efficient`` fails
(``lxt/efficient/models/bert.py`` imports ``transformers.modeling_attn_mask_utils``, removed in
transformers 5, and ``vit_torch.py`` imports torchvision), and ``patch_attention`` replaces the module's
``ALL_ATTENTION_FUNCTIONS`` by a plain dict, which transformers 5 calls ``.get_interface`` on. So this
script registers the two packages ``lxt.efficient`` / ``lxt.efficient.models`` without running their
``__init__`` (nothing of lxt's is changed), applies lxt's family map (``lxt.efficient.models.<family>
.attnLRP``) exactly as ``lxt.efficient.monkey_patch`` would for every entry but the attention one, and
for attention applies lxt's own ``wrap_attention_forward`` to the module's ``eager_attention_forward``
(the first half of ``patch_attention``; the model runs with ``attn_implementation="eager"``).

Usage: ``python _lxt_reference.py FAMILY MODEL_DIR INPUTS.pt OUT.pt`` with FAMILY in qwen2, gemma3, llama.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch


def _bare_package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def main(family: str, model_dir: str, inputs_path: str, out_path: str) -> None:
    import lxt

    root = Path(lxt.__file__).parent
    _bare_package("lxt.efficient", root / "efficient")
    _bare_package("lxt.efficient.models", root / "efficient" / "models")
    patches = importlib.import_module("lxt.efficient.patches")
    fam = importlib.import_module(f"lxt.efficient.models.{family}")
    modeling = {"qwen2": "transformers.models.qwen2.modeling_qwen2", "gemma3": "transformers.models.gemma3.modeling_gemma3",
                "llama": "transformers.models.llama.modeling_llama"}[family]
    modeling = importlib.import_module(modeling)
    for target, patch in fam.attnLRP.items():
        if target is modeling:  # the attention entry (patch_attention): its transformers-5-compatible half
            modeling.eager_attention_forward = patches.wrap_attention_forward(modeling.eager_attention_forward)
        else:
            assert patch(target), f"lxt failed to patch {target}"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    d = torch.load(inputs_path)
    emb = d["inputs_embeds"].clone().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits[0]
    target = logits[torch.arange(len(d["target_ids"])), d["target_ids"]].sum()  # lxt's convention: the logit
    target.backward()
    torch.save({"relevance": (emb * emb.grad).detach(), "target": target.detach()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
