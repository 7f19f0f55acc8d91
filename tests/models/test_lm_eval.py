"""The lm-evaluation-harness model ``compress-recover`` (models/harness.py) and its command line
(experiments/lm_eval.py): same numbers as lm-eval's own ``hf`` model on the same weights, and as
our forward, perplexity and generation code.

The tiny random model is exported as a Hugging Face directory with a small byte-level BPE
tokenizer (the 256 bytes, a few merges and an end-of-text token), so that both lm-eval's ``hf``
model and ours (``models.loading`` reads the same tokenizer files) can load it.
"""

import json
import pathlib
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# pylint: disable=g-import-not-at-top,g-bad-import-order
from lm_eval.api import registry
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from compress import quantize
from experiments import lm_eval as cli
from experiments import tiny_families as families
from kernels import CompressedLinear, LowRank, QuantSpec, dequantize
from models import checkpoint
from models import config as config_lib
from models import evaluate as eval_lib
from models import export
from models import harness
from models import llama
from models import loading
from models import tree
from tests.utils import write_mc_task

ROOT = pathlib.Path(__file__).resolve().parents[2]
EOT = '<|endoftext|>'
MAX_LENGTH = 48  # short, so that contexts are cut and texts span several rolling windows
MERGES = [('Ġ', 't'), ('h', 'e'), ('Ġt', 'he'), ('Ġ', 'a'), ('i', 's'), ('Ġ', 'is'), ('a', 't'),
          ('Ġ', 'c'), ('Ġc', 'at'), ('o', 'g'), ('Ġ', 'd'), ('Ġd', 'og'), ('e', 'r'), ('Ġ', 'w'),
          ('o', 'r'), ('Ġw', 'or'), ('l', 'd'), ('Ġwor', 'ld'), ('A', 'n'), ('An', 's'),
          ('Ans', 'w'), ('Answ', 'er')]
WORDS = ['the', 'cat', 'is', 'a', 'dog', 'world', 'answer', 'tiny', 'model', 'of']


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 bytes to printable characters (byte-level BPE's alphabet)."""
  bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), 256)]
  cs = list(bs)
  extra = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return dict(zip(bs, map(chr, cs)))


def byte_bpe_tokenizer():
  """A ``PreTrainedTokenizerFast``: byte ids 0..255 (in byte order), :data:`MERGES`, then EOT."""
  from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
  b2u = _bytes_to_unicode()
  vocab = {b2u[b]: b for b in range(256)}
  for a, b in MERGES:
    assert a in vocab and b in vocab, (a, b)
    vocab.setdefault(a + b, len(vocab))
  tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=MERGES))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOT])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random tiny Llama with the byte-level BPE tokenizer, as a Hugging Face directory."""
  tok = byte_bpe_tokenizer()
  eot = tok.convert_tokens_to_ids(EOT)
  cfg = config_lib.tiny_config(vocab_size=len(tok), bos_token_id=eot, eos_token_id=eot)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  return export.save_hf(tmp_path_factory.mktemp('lm_eval') / 'hf', params, cfg, tokenizer=tok)


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  """A local multiple-choice task (YAML + JSONL): ``tiny_mc``, 24 questions of 3 choices."""
  d = tmp_path_factory.mktemp('tasks')
  rng = random.Random(0)
  words = lambda lo, hi: ' '.join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
  docs = [{'question': words(2, 30), 'choices': [words(1, 4) for _ in range(3)],
           'gold': rng.randrange(3)} for _ in range(24)]
  write_mc_task(d, docs)
  return d


@pytest.fixture(scope='module')
def ours(hf_dir):
  return harness.CompressRecoverLM(model=str(hf_dir), batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope='module')
def hf(hf_dir):
  return HFLM(pretrained=str(hf_dir), device='cpu', dtype='float32', batch_size=4,
              max_length=MAX_LENGTH)


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _evaluate(lm, task_dir):
  manager = TaskManager(include_path=str(task_dir), include_defaults=False)
  res = lm_eval.simple_evaluate(model=lm, tasks=['tiny_mc'], task_manager=manager,
                                bootstrap_iters=0, log_samples=True)
  samples = sorted(res['samples']['tiny_mc'], key=lambda s: s['doc_id'])
  return res['results']['tiny_mc'], [[r[0] for r in s['resps']] for s in samples]


def test_registered_beside_the_built_in_models():
  assert registry.get_model('compress-recover') is harness.CompressRecoverLM
  assert registry.get_model('hf') is HFLM


def test_multiple_choice_task_matches_hf(ours, hf, task_dir):
  """Accuracy and every choice's (loglikelihood, is_greedy) of a local task equal the ``hf``
  model's on the same weights; the longer questions are cut to max_length on both sides."""
  got, got_resps = _evaluate(ours, task_dir)
  want, want_resps = _evaluate(hf, task_dir)
  lls = np.array([[ll for ll, _ in item] for item in got_resps])
  hf_lls = np.array([[ll for ll, _ in item] for item in want_resps])
  diff = np.abs(lls - hf_lls).max()
  print(f'tiny_mc: max |ll ours - ll hf| = {diff:.2e}; acc ours {got["acc,none"]}, hf '
        f'{want["acc,none"]}; acc_norm ours {got["acc_norm,none"]}, hf {want["acc_norm,none"]}')
  assert lls.shape == (24, 3)
  np.testing.assert_allclose(lls, hf_lls, atol=1e-4, rtol=0)
  assert [[g for _, g in item] for item in got_resps] == [[g for _, g in i] for i in want_resps]
  assert (lls.argmax(1) == hf_lls.argmax(1)).all()
  assert got['acc,none'] == want['acc,none'] and got['acc_norm,none'] == want['acc_norm,none']


def test_encoding_matches_hf(ours, hf):
  """Trailing whitespace of the context, an empty context, a context that starts with the
  end-of-text token and a context longer than max_length are encoded and scored as by ``hf``."""
  pairs = [('the cat is ', 'a dog'), ('the cat is', ' a dog'), ('', 'the world'),
           (EOT + 'the dog', ' is'), (' '.join(['the cat'] * 40), ' is a dog'),
           ('Answer:', ' the tiny model of the world')]
  for ctx, cont in pairs:
    assert ours.tok_encode(ctx + cont) == hf.tok_encode(ctx + cont)
  got = ours.loglikelihood(_requests('loglikelihood', pairs), disable_tqdm=True)
  want = hf.loglikelihood(_requests('loglikelihood', pairs), disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
  assert [g[1] for g in got] == [w[1] for w in want]
  # The first two pairs are the same text split differently: hf moves the space, so do we.
  assert got[0][0] == pytest.approx(got[1][0], abs=1e-5)


def test_rolling_loglikelihood_is_our_perplexity_over_lm_eval_windows(ours, hf):
  """``loglikelihood_rolling`` = minus the summed token NLL (``models.evaluate.token_nll``) over
  lm-eval's disjoint windows: the first window after the prefix token, then windows of
  max_length tokens each scoring only the tokens not scored before. Equals ``hf``'s too."""
  rng = random.Random(1)
  texts = [' '.join(rng.choice(WORDS) for _ in range(n)) for n in (70, 5, 31)]
  got = ours.loglikelihood_rolling(_requests('loglikelihood_rolling', [(t,) for t in texts]),
                                   disable_tqdm=True)
  m = MAX_LENGTH
  token_nll = jax.jit(eval_lib.token_nll, static_argnames=('cfg',))
  for text, value in zip(texts, got):
    toks = ours.tok_encode(text)
    seq = [ours.prefix_token_id] + toks  # toks[i] is seq[i + 1]
    first = min(m, len(toks))
    windows = [(seq[:first + 1], first)]  # (tokens, how many of the last predictions count)
    for start in range(first, len(toks), m):
      end = min(start + m, len(toks))
      windows.append((seq[end - m:end + 1], end - start))
    total = 0.0
    for window, n_scored in windows:
      nll = token_nll(ours.params, jnp.asarray([window]), ours.config)
      total -= float(np.asarray(nll, np.float64)[0, -n_scored:].sum())
    assert sum(n for _, n in windows) == len(toks)
    assert value == pytest.approx(total, abs=1e-4)
  assert len(ours.rolling_windows(texts[0])) >= 3  # the long text spans several windows
  want = hf.loglikelihood_rolling(_requests('loglikelihood_rolling', [(t,) for t in texts]),
                                  disable_tqdm=True)
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_generate_until_is_greedy_llama_generate_cut_at_the_stop_string(ours, hf):
  """Prompts of different lengths (one longer than max_length - max_gen_toks, cut from the left)
  decoded together give ``models.llama.generate``'s greedy text for each prompt alone, cut at
  the first ``until`` string; ``hf`` gives the same."""
  n_new = 12
  prompts = ['the cat', 'Answer: the tiny model of the world is a', ' '.join(['a dog'] * 20)]
  eot = ours.eot_token_id
  generate = jax.jit(lambda p, t: llama.generate(p, t, ours.config, max_new_tokens=n_new))

  def reference(prompt):
    toks = ours.tok_encode(prompt)[-(MAX_LENGTH - n_new):]
    out = np.asarray(generate(ours.params, jnp.asarray([toks])))[0].tolist()
    return ours.tok_decode(out[:out.index(eot)] if eot in out else out)

  full = [reference(p) for p in prompts]
  stop = full[1][len(full[1]) // 2:len(full[1]) // 2 + 2]
  assert stop and len(full[1].split(stop)[0]) < len(full[1])
  gen_kwargs = {'until': [stop], 'max_gen_toks': n_new, 'do_sample': False}
  reqs = _requests('generate_until', [(p, gen_kwargs) for p in prompts])
  got = ours.generate_until(reqs, disable_tqdm=True)
  assert got == [t.split(stop)[0] for t in full]
  assert got[1] == full[1].split(stop)[0]
  assert hf.generate_until(_requests('generate_until', [(p, gen_kwargs) for p in prompts]),
                           disable_tqdm=True) == got


def _sliding_model(name, tmp_path):
  """``(config, params)`` of a tiny model with sliding-window layers: Gemma 2/3 from transformers'
  classes (alternating sliding and global layers), or a Mistral-like Llama whose every layer
  slides; the window is ``families.SLIDING_WINDOW``."""
  if name == 'mistral':
    cfg = config_lib.tiny_config(vocab_size=160, sliding_window=families.SLIDING_WINDOW)
    return cfg, llama.init_params(cfg, jax.random.key(4), scale=0.2)
  model, _ = families.hf_model(name, seed=1, weight_std=0.03)  # greedy tokens that vary
  model.save_pretrained(tmp_path / name, safe_serialization=True)
  return loading.load_hf_dir(tmp_path / name)


def _greedy_without_cache(params, cfg, prompt, n_new):
  """Greedy tokens of the cache-free forward on the growing sequence (right-padded to one
  width: causal attention never sees the padding)."""
  forward = jax.jit(lambda p, t: llama.forward(p, t, cfg))
  seq = list(prompt)
  width = len(prompt) + n_new
  for _ in range(n_new):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(forward(params, jnp.asarray(tokens)))[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize('name', ['gemma2', 'gemma3', 'mistral'])
def test_batched_generation_keeps_a_ring_of_the_window_on_sliding_layers(name, tmp_path,
                                                                       monkeypatch):
  """Right-padded prompts of different lengths (two longer than the sliding window) decoded
  together far past the window: each row's tokens are the cache-free forward's greedy tokens and
  ``models.llama.generate``'s on that prompt alone, and every cache the harness allocates on a
  sliding-window layer (prefill and every decoding call) has the window's length, a global
  layer's the full length. ``generate_until`` runs the same caches."""
  cfg, params = _sliding_model(name, tmp_path)
  window = families.SLIDING_WINDOW
  sliding = [cfg.layer(i).sliding_window is not None for i in range(cfg.num_layers)]
  assert any(sliding) and (all(sliding) if name == 'mistral' else not all(sliding))
  shapes = []  # (call, [cache shape per layer]) of every prefill and decoding call

  def spy(fn, call, at):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      if call == 'decode':
        shapes.append(('decode in', [c['k'].shape for c in args[2]]))
      shapes.append((call, [c['k'].shape for c in out[at]]))
      return out
    return wrapped

  # pylint: disable=protected-access
  monkeypatch.setattr(harness, '_prefill', spy(harness._prefill, 'prefill', 1))
  monkeypatch.setattr(harness, '_decode', spy(harness._decode, 'decode', 2))
  # pylint: enable=protected-access

  rng = np.random.default_rng(5)
  lengths = [3, 13, 20, 9]  # 13 and 20 > the window of 8
  prompts = [rng.integers(1, cfg.vocab_size, size=n).tolist() for n in lengths]
  n_new = 2 * window + 3
  rows, chunk = 6, 5  # two padding rows; several decoding calls
  got = harness.greedy_generate(params, cfg, prompts, n_new, rows=rows, chunk=chunk)
  generate = jax.jit(lambda p, t: llama.generate(p, t, cfg, max_new_tokens=n_new))
  for prompt, out in zip(prompts, got):
    assert out == _greedy_without_cache(params, cfg, prompt, n_new)
    assert out == np.asarray(generate(params, jnp.asarray([prompt])))[0].tolist()
  assert min(len(set(out)) for out in got) >= 3  # no row repeats one token

  width = harness.bucket_length(max(lengths))
  full = width + -(-(n_new - 1) // chunk) * chunk  # prompt bucket + decoding steps
  assert full > 4 * window
  want = [(rows, window if s else full, cfg.num_kv_heads, cfg.head_dim) for s in sliding]
  assert [call for call, _ in shapes[:2]] == ['prefill', 'decode in']
  assert len(shapes) == 1 + 2 * -(-(n_new - 1) // chunk)
  assert all(got_shapes == want for _, got_shapes in shapes), shapes

  # lm-eval's generate_until (a character tokenizer over the same ids) runs the same caches.
  tok = families.char_tokenizer(cfg.vocab_size)
  lm = harness.CompressRecoverLM(model=loading.LoadedModel(cfg, params, name, lambda: tok),
                                 batch_size=4, max_gen_toks=n_new)
  texts = ['a cat', 'the tiny model of', 'the world is a dog of', 'answer: a']
  shapes.clear()
  outs = lm.generate_until(_requests('generate_until', [(t, {'until': []}) for t in texts]),
                           disable_tqdm=True)
  for text, out in zip(texts, outs):
    toks = lm.tok_encode(text)
    assert out == lm.tok_decode(_greedy_without_cache(params, cfg, toks, n_new))
  longest = max(len(lm.tok_encode(t)) for t in texts)
  assert longest > window
  full = harness.bucket_length(longest) + n_new - 1  # one decoding call: n_new - 1 <= its chunk
  want = [(4, window if s else full, cfg.num_kv_heads, cfg.head_dim) for s in sliding]
  assert [call for call, _ in shapes] == ['prefill', 'decode in', 'decode']
  assert all(got_shapes == want for _, got_shapes in shapes), shapes


def test_compressed_save_dir_is_scored_as_saved(hf_dir, ours, tmp_path):
  """A ``--save`` directory (RTN 4-bit + rank-8 SVD adapters of the error, ZeroQuant-V2's LoRC)
  is evaluated with its compressed leaves (no dense tree is made) and gives our forward's
  log-likelihoods on those leaves."""
  dense, cfg = ours, ours.config

  @jax.jit
  def rtn(w):
    q = quantize.rtn(w, QuantSpec(bits=4, group_size=32))
    return q, w - dequantize(q)

  def rtn_lorc(w):  # the rank-8 truncated SVD of the error (recover.lowrank.svd_compensate)
    q, delta = rtn(w)
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    a, b = u[:, :8] * np.sqrt(s[:8]), np.sqrt(s[:8])[:, None] * vt[:8]
    return CompressedLinear(weight=q, adapter=LowRank(a=jnp.asarray(a, jnp.float32),
                                                      b=jnp.asarray(b, jnp.float32)))

  params = tree.replace_leaves(dense.params, {path: rtn_lorc(w) for path, w in
                                              tree.linear_leaves(dense.params).items()})
  saved = tmp_path / 'saved'
  checkpoint.save_model(saved, params, cfg, {'method': 'rtn w4g32 + svd r8', 'model': str(hf_dir)})

  lm = harness.CompressRecoverLM(model=str(saved), batch_size=4, max_length=MAX_LENGTH)
  leaves = tree.linear_leaves(lm.params)
  assert len(leaves) == 7 * cfg.num_layers
  assert all(isinstance(x, CompressedLinear) and x.adapter is not None for x in leaves.values())
  assert lm.get_model_info()['compressed_linears'] == len(leaves)
  assert lm.tok_encode('the cat') == dense.tok_encode('the cat')  # the source model's tokenizer

  pairs = [('the cat is', ' a dog'), ('Answer:', ' the world'), ('the dog ' * 12, 'is a cat')]
  got = [ll for ll, _ in lm.loglikelihood(_requests('loglikelihood', pairs), disable_tqdm=True)]
  encoded = [lm._encode_pair(c, k) for c, k in pairs]  # pylint: disable=protected-access
  rows = [(c + k)[-(MAX_LENGTH + 1):] for c, k in encoded]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right-padded: causal, harmless
  for r, toks in enumerate(rows):
    tokens[r, :len(toks)] = toks
  logp = np.asarray(jax.nn.log_softmax(
      jax.jit(lambda p, t: llama.forward(p, t, cfg))(lm.params, tokens), axis=-1))
  want = []
  for r, (toks, (_, cont)) in enumerate(zip(rows, encoded)):
    pos = np.arange(len(toks) - len(cont) - 1, len(toks) - 1)
    want.append(float(logp[r, pos, cont].sum()))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  before = [ll for ll, _ in dense.loglikelihood(_requests('loglikelihood', pairs),
                                                disable_tqdm=True)]
  assert np.abs(np.array(got) - np.array(before)).max() > 1e-3  # compression changed the model


def test_command_runs_a_local_task_and_writes_results(hf_dir, task_dir, tmp_path, ours):
  out = tmp_path / 'out'
  res = cli.run(model=str(hf_dir), tasks=['tiny_mc'], include_path=str(task_dir), batch_size=4,
                max_length=MAX_LENGTH, bootstrap_iters=0, out_dir=str(out))
  saved = json.loads((out / 'results.json').read_text())
  acc = {r['metric']: r['value'] for r in saved['rows']}
  want, _ = _evaluate(ours, task_dir)
  assert acc == {'acc': want['acc,none'], 'acc_norm': want['acc_norm,none']}
  assert saved['results']['tiny_mc']['acc,none'] == want['acc,none']
  assert saved['config']['model'] == 'compress-recover' and saved['flags']['tasks'] == ['tiny_mc']
  assert '| tiny_mc | acc |' in (out / 'table.md').read_text()
  assert res['tasks'] == ['tiny_mc']


def test_command_refuses_bad_flags_before_loading(hf_dir, task_dir, tmp_path):
  with pytest.raises(cli.LmEvalError) as e:
    cli.run(model=str(hf_dir), tasks=['tiny_mc', 'no_such_task'], include_path=str(task_dir))
  assert e.value.problems == ["--tasks: unknown task 'no_such_task': not an lm-eval task, group "
                              'or tag nor in --include_path']
  missing = tmp_path / 'missing'
  proc = subprocess.run([sys.executable, '-m', 'experiments.lm_eval', f'--model={missing}',
                         '--tasks=tiny_mc', f'--include_path={task_dir}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f'error: --model={missing}: model path {missing} does not exist']
  assert not proc.stdout
