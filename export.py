"""Export a checkpoint's weights to Hugging Face format: model.safetensors + config.json, which
transformers' LlamaForCausalLM loads as is (tests/test_model.py proves the logits are equal).

    python export.py out/base out/base-hf

The tokenizer stays this project's: encode with data/tokenizer.py.
"""
import argparse
import json
import os
import sys

from checkpoints import load_checkpoint
from ground import UserError, die, sigterm_stops, stop_reason, writable_dir
from model import GPT


def export_hf(model: GPT, out_dir: str):
    """Write `model.safetensors` + `config.json` that transformers' LlamaForCausalLM loads as is."""
    from safetensors.torch import save
    c = model.config
    os.makedirs(out_dir, exist_ok=True)
    tensors = {("model." + k if not k.startswith("lm_head") else k): v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:  # a full disk: OSError
        f.write(save(tensors, metadata={"format": "pt"}))
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
              hidden_size=c.n_embd, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layer,
              num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
              head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act="silu",
              attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
              torch_dtype="float32")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


@sigterm_stops()  # SIGTERM stops it as Ctrl-C does
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder of a language model, e.g. "
                   "out/base")
    p.add_argument("out", metavar="OUT", help="folder to write, e.g. out/base-hf")
    args = p.parse_args(argv)
    try:
        model, _, ckpt = load_checkpoint(args.ckpt, flag="CKPT")
        if model.head != "lm":
            raise UserError(f"CKPT {args.ckpt}: a '{ckpt['stage']}' checkpoint, which scores "
                            "answers; only language models export to LlamaForCausalLM")
        writable_dir(args.out, "OUT")
        export_hf(model, args.out)
    except UserError as e:
        die(str(e))
    except (OSError, KeyboardInterrupt) as e:  # a full disk, say: only the export is touched
        sys.exit(f"stopped: {stop_reason(e)}; the export in {args.out} is incomplete")
    print(f"wrote {args.out}/model.safetensors and {args.out}/config.json")


if __name__ == "__main__":
    main()
