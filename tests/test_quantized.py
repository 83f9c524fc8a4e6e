"""Quantized base models (issue 17): experts fused beside bitsandbytes 4-bit / 8-bit layers.

The base output comes from the quantized module itself and the experts run beside it
in the compute dtype, checked against PEFT's own bnb LoRA layers on the same quantized
model; merges export a PEFT adapter that loads on it, and merging into its weights (a
dequantized full model) is refused. Runs on bitsandbytes' CPU backend; skipped, with
the reason, where bitsandbytes is missing or cannot run a 4-bit layer on this machine.

On CPUs with AVX512-BF16, bitsandbytes runs an eval-mode 4-bit layer through a packed
bf16 kernel (in_features must be a multiple of its block size, 64: hence hidden 64), and
bf16 rounding of the activations turns 1e-7 differences into 1e-4 ones a few layers on.
The exact comparisons therefore run in training mode (dequantize, then an fp32
product, the path every machine has) and the eval path is checked to 1e-3.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (pip install 'lorafuse[quantized]')"
)

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from lorafuse.errors import LorafuseError  # noqa: E402
from lorafuse.library import ExpertLibrary  # noqa: E402
from lorafuse.merge import merge, merged_state_dict, save_adapter  # noqa: E402
from lorafuse.mixers.routers import build_routers  # noqa: E402
from lorafuse.model import attach, is_quantized, refuse_quantized  # noqa: E402
from tests.conftest import LLAMA_TARGETS, load_base, make_adapter  # noqa: E402


def _cpu_backend_fails() -> str | None:
    # why bitsandbytes cannot run a 4-bit and an 8-bit layer on this CPU, or None
    try:
        x = torch.randn(2, 64)
        for layer in (
            bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32),
            bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False),
        ):
            layer.to("cpu").eval()(x)
    except Exception as e:  # an old bitsandbytes without a CPU backend, a missing library
        return f"bitsandbytes {bnb.__version__} cannot run on this CPU: {type(e).__name__}: {e}"
    return None


pytestmark = [
    pytest.mark.skipif(bool(_cpu_backend_fails()), reason=str(_cpu_backend_fails())),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
]
KINDS = {
    "4bit": dict(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"
    ),
    "8bit": dict(load_in_8bit=True),
}
EXPERTS = [
    (["q_proj", "v_proj"], dict(r=4, lora_alpha=8)),
    (LLAMA_TARGETS, dict(r=2, lora_alpha=8)),
    (["k_proj", "o_proj", "down_proj"], dict(r=3, lora_alpha=6, use_rslora=True)),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base dir, expert dirs): a Llama of hidden 64 (bitsandbytes' CPU block size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    dirs = [
        make_adapter(root / "base", root / f"q{i}", 900 + i, targets, **kw)
        for i, (targets, kw) in enumerate(EXPERTS)
    ]
    return root / "base", dirs


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))  # (B, T)


def quantized(base_dir, kind: str, train: bool = True, **extra):
    """The base model loaded quantized; `train`: the dequantizing fp32 path (see the doc)."""
    cfg = BitsAndBytesConfig(**{**KINDS[kind], **extra})
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=cfg, device_map="cpu"
    )
    return model.train(train)


def peft(base_dir, kind: str, adapter, train: bool = True):
    """PEFT's own bnb LoRA layers on the quantized base (from_pretrained sets eval mode)."""
    return PeftModel.from_pretrained(quantized(base_dir, kind), adapter).train(train)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits  # (B, T, V)


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_hot_equals_peft_on_the_quantized_base(setup, kind, tokens):
    base_dir, dirs = setup
    refs = [_logits(peft(base_dir, kind, d), tokens) for d in dirs]
    model = quantized(base_dir, kind)
    plain = _logits(model, tokens)
    library = ExpertLibrary.load(dirs)
    for space in ("factors", "deltas"):
        with attach(model, library, space) as fusion:
            layer = fusion.layers["model.layers.0.self_attn.q_proj"]
            assert type(layer.base).__module__.startswith("bitsandbytes")  # still quantized
            assert layer.A_rows.dtype == torch.float32  # the compute dtype
            for i, ref in enumerate(refs):
                assert (ref - plain).abs().max() > 1e-3  # the expert does something
                fusion.set_expert(i)
                assert (_logits(model, tokens) - ref).abs().max() <= 1e-5, (space, i)


@pytest.mark.parametrize("kind", list(KINDS))
def test_base_output_comes_from_the_quantized_layer(setup, kind, tokens):
    base_dir, dirs = setup
    model = quantized(base_dir, kind, train=False)  # the eval path, packed on AVX512-BF16
    plain = _logits(model, tokens)
    full = _logits(load_base(base_dir), tokens)
    assert (plain - full).abs().max() > 1e-4  # quantization changes the base
    fusion = attach(model, ExpertLibrary.load(dirs), "factors")
    fusion.set_coefficients(None)
    assert torch.equal(_logits(model, tokens), plain)
    fusion.set_expert(1)
    ref = _logits(peft(base_dir, kind, dirs[1], train=False), tokens)
    assert (_logits(model, tokens) - ref).abs().max() <= 1e-3  # bf16 kernel: see the doc
    fusion.detach()
    assert is_quantized(model) and torch.equal(_logits(model, tokens), plain)


@pytest.mark.parametrize("space", ["factors", "deltas"])
def test_merged_adapter_loads_on_the_quantized_base(setup, space, tokens, tmp_path):
    base_dir, dirs = setup
    library = ExpertLibrary.load(dirs)
    weights = torch.tensor([0.5, 0.3, 0.2])
    out = save_adapter(merge(library, weights, space), tmp_path / "merged")
    model = quantized(base_dir, "4bit")
    with attach(model, library, space) as fusion:
        fusion.set_coefficients(weights)
        ours = _logits(model, tokens)
    exported = _logits(peft(base_dir, "4bit", out), tokens)
    assert (ours - exported).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_merging_into_quantized_weights_is_refused(setup, kind):
    base_dir, dirs = setup
    model = quantized(base_dir, kind)
    merged = merge(ExpertLibrary.load(dirs), torch.tensor([0.5, 0.3, 0.2]), "deltas")
    bits = kind.replace("bit", "-bit")
    with pytest.raises(LorafuseError, match=f"quantized .*{bits} layers: .*q_proj.*PEFT adapter"):
        merged_state_dict(model, merged)  # the full model `merge --base` would save
    with pytest.raises(LorafuseError, match=f"quantized .*{bits}.*q_proj.*PEFT adapter"):
        refuse_quantized(model)
    assert not is_quantized(load_base(base_dir))
    refuse_quantized(load_base(base_dir))  # a full-precision model passes


def test_routed_generation_on_a_4bit_base(setup, tokens):
    base_dir, dirs = setup
    model = quantized(base_dir, "4bit", train=False)
    library = ExpertLibrary.load(dirs)
    with attach(model, library, "factors") as fusion:
        fusion.set_mixers(build_routers(library, router="arrow", top_k=2))
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            cached = model.generate(tokens[:, :4], use_cache=True, **kw)  # (B, 9)
            uncached = model.generate(tokens[:, :4], use_cache=False, **kw)
        assert cached.shape == (2, 9) and torch.equal(cached, uncached)


def test_router_gradients_equal_those_on_the_dequantized_model(setup, tokens):
    # Independent check of forward and backward: a full-precision copy whose weights are
    # the 4-bit layers' dequantized ones (bitsandbytes' training path computes exactly that).
    from lorafuse.base_layers import quantization

    base_dir, dirs = setup
    model = quantized(base_dir, "4bit")  # training mode from the start (never packed)
    full = load_base(base_dir)
    for name, m in model.named_modules():
        if quantization(m):
            W = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)  # (O, D)
            full.get_submodule(name).weight.data.copy_(W)
    library = ExpertLibrary.load(dirs)
    losses, grads = [], []
    for m in (model, full):
        with attach(m, library, "factors") as fusion:
            routers = build_routers(library, router="linear", init="arrow")
            fusion.set_mixers(routers)
            loss = m(tokens, labels=tokens).loss
            loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([r.weight.grad.flatten() for r in routers.values()]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_experts_run_in_the_4bit_compute_dtype(setup, tokens):
    base_dir, dirs = setup
    bf16 = quantized(base_dir, "4bit", bnb_4bit_compute_dtype=torch.bfloat16)
    fp32 = quantized(base_dir, "4bit")
    library = ExpertLibrary.load(dirs)
    with attach(bf16, library, "deltas") as fusion, attach(fp32, library, "deltas") as ref:
        assert fusion.layers["model.layers.1.mlp.down_proj"].A_rows.dtype == torch.bfloat16
        fusion.set_expert(2)
        ref.set_expert(2)
        ours = _logits(bf16, tokens)
        assert ours.dtype == torch.float32  # the activations keep the model's dtype
        assert (ours - _logits(fp32, tokens)).abs().max() <= 5e-2  # bf16 products


def test_cli_merge_into_a_quantized_checkpoint_writes_nothing(setup, tmp_path):
    from typer.testing import CliRunner

    from lorafuse.cli import app

    base_dir, dirs = setup
    quantized(base_dir, "4bit").save_pretrained(tmp_path / "q4")  # a pre-quantized checkpoint
    out, full = tmp_path / "adapter", tmp_path / "full"
    args = ["merge", *map(str, dirs), "--out", str(out), "--base", str(tmp_path / "q4")]
    res = CliRunner().invoke(app, [*args, "--model-out", str(full)], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert "4-bit layer" in res.output and "PEFT adapter" in res.output
    assert not out.exists() and not full.exists()  # refused before anything is written
