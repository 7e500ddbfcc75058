"""Share an adapter on the Hugging Face Hub: safetensors only, with a model card that says how to load it.

Works for every method of the package (SVF, SpectralCompress, CoreIsolation): they are ordinary PEFT adapters.
Whoever loads one must `import peft_spectral` first (it registers the method types with PEFT).

    huggingface-cli login                                            # or export HF_TOKEN=...
    python examples/push_to_hub.py --adapter runs/svf-trainer --repo-id me/svf-addition
    python examples/push_to_hub.py --repo-id me/svf-test --dry-run   # save locally, list what would be uploaded
    python examples/push_to_hub.py --tiny --dry-run                  # tiny random model, no network at all
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from tiny_model import load

from peft_spectral import SVFConfig
from peft_spectral.adapter_io import validate_adapter_dir


USAGE = """
## Usage

This adapter was made with `peft_spectral` ({method}). Import the package before loading it, so that PEFT
knows the `{peft_type}` method:

```python
import peft_spectral                                   # registers the method with PEFT
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download)")
    parser.add_argument(
        "--model", default=None, help="base model: Hub id or directory (default: embedded SmolLM2-135M)"
    )
    parser.add_argument("--adapter", default=None, help="saved adapter directory (default: a fresh SVF adapter)")
    parser.add_argument("--repo-id", default="your-name/svf-adapter", help="Hub repository to push to")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="save locally and list the files, push nothing")
    parser.add_argument("--output", default="runs/push", help="local copy of what is pushed")
    args = parser.parse_args()

    base, _tokenizer = load(args.tiny, args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    else:
        model = get_peft_model(base, SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    config = model.peft_config["default"]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))

    # 1. Save exactly what will be uploaded: adapter_config.json, adapter_model.safetensors (never pickles), README.md.
    out = Path(args.output)
    model.save_pretrained(str(out), safe_serialization=True)
    card = ModelCard.load(str(out / "README.md"))
    card.data.tags = sorted(set((card.data.tags or []) + ["peft", "peft_spectral", peft_type.lower()]))
    card.text = (
        card.text.rstrip()
        + "\n"
        + USAGE.format(method=type(config).__name__, peft_type=peft_type, repo_id=args.repo_id)
    )
    card.save(str(out / "README.md"))

    # 2. Check it the way a user's loader will (safetensors readable, finite, the expected PEFT type).
    validate_adapter_dir(out, expected_type=peft_type)
    files = sorted(p for p in out.iterdir() if p.is_file())
    print(f"{peft_type} adapter for {args.repo_id}:")
    for f in files:
        print(f"  {f.name:32s} {f.stat().st_size:>10,d} bytes")

    base_path = getattr(config, "base_model_name_or_path", None)
    if base_path and Path(base_path).exists():
        print(
            f"note: the adapter's base model is the local path {base_path}; AutoPeftModelForCausalLM cannot fetch it on "
            "other machines, so users must load the base model themselves (see docs/hub.md)"
        )
    if args.dry_run:
        print(f"dry run: nothing uploaded; the {len(files)} files above are in {out}")
        return
    # 3. Upload the folder as it is (PeftModel.push_to_hub(repo_id) would save and upload in one call, too).
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(folder_path=str(out), repo_id=args.repo_id, commit_message=f"Upload {peft_type} adapter")
    print(f"pushed: {getattr(info, 'commit_url', info)}")


if __name__ == "__main__":
    main()
