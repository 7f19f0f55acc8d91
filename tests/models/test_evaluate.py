"""Perplexity, KL/top-1 and multiple-choice scoring against brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_lib
from models import data as data_lib
from models import evaluate as eval_lib
from models import llama, loading


@pytest.fixture(scope='module')
def tiny():
  cfg = config_lib.tiny_config()
  return cfg, llama.init_params(cfg, jax.random.key(0), scale=0.3)


def _np_logp(params, cfg, tokens):
  logits = np.asarray(llama.forward(params, jnp.asarray(tokens), cfg), np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def test_perplexity_matches_brute_force(tiny):
  cfg, params = tiny
  windows = np.asarray(jax.random.randint(jax.random.key(1), (5, 24), 0, cfg.vocab_size))
  out = eval_lib.perplexity(params, cfg, windows, batch_size=2, progress=False)
  lp = _np_logp(params, cfg, windows)
  nll = -np.take_along_axis(lp[:, :-1], windows[:, 1:, None], -1).mean()
  assert out['eval_tokens'] == 5 * 23
  np.testing.assert_allclose(out['ppl'], np.exp(nll), rtol=1e-5)


def test_compare_kl_and_top1(tiny):
  cfg, params = tiny
  other = llama.init_params(cfg, jax.random.key(7), scale=0.3)
  windows = np.asarray(jax.random.randint(jax.random.key(1), (3, 16), 0, cfg.vocab_size))
  same = eval_lib.compare(params, params, cfg, windows, progress=False)
  assert abs(same['kl']) < 1e-6 and same['top1'] == 1.0 and same['ppl'] == same['ppl_ref']
  diff = eval_lib.compare(params, other, cfg, windows, progress=False)
  lr, lo = _np_logp(params, cfg, windows)[:, :-1], _np_logp(other, cfg, windows)[:, :-1]
  kl = (np.exp(lr) * (lr - lo)).sum(-1).mean()
  top1 = (lr.argmax(-1) == lo.argmax(-1)).mean()
  np.testing.assert_allclose(diff['kl'], kl, rtol=1e-4)
  np.testing.assert_allclose(diff['top1'], top1)
  assert diff['kl'] > 0.01


def _loglik(params, cfg, tok, context, choice):
  ctx = tok(context)['input_ids']
  full = tok(context + choice)['input_ids']
  lp = _np_logp(params, cfg, np.asarray([full]))[0]
  return sum(lp[t - 1, full[t]] for t in range(len(ctx), len(full)))


def test_multiple_choice_known_answers(tiny, tmp_path):
  cfg, params = tiny
  tok = loading.ByteTokenizer()
  contexts = ['The sky is', 'Two plus two is', 'Water is', 'abc']
  choices = [[' blue', ' green', ' loud'], [' four', ' five'], [' wet', ' dry', ' x', ' yy'],
             [' d', ' e']]
  # Gold = the brute-force argmax for the first half, the argmin for the second half.
  lines, expect = [], []
  for i, (c, ch) in enumerate(zip(contexts, choices)):
    ll = [_loglik(params, cfg, tok, c, x) for x in ch]
    gold = int(np.argmax(ll)) if i < 2 else int(np.argmin(ll))
    expect.append(i < 2)
    lines.append({'context': c, 'choices': ch, 'gold': gold})
  path = tmp_path / 'task.jsonl'
  import json
  path.write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
  items = data_lib.load_mc_jsonl(path)
  out = eval_lib.score_multiple_choice(params, cfg, tok, items, batch_size=3, progress=False)
  assert out['n'] == 4
  assert out['acc'] == pytest.approx(0.5)
  for i, (c, ch) in enumerate(zip(contexts, choices)):
    ll = [_loglik(params, cfg, tok, c, x) for x in ch]
    assert out['predictions'][i] == int(np.argmax(ll))


def test_compare_many_equals_compare(tiny):
  cfg, params = tiny
  others = {f'm{i}': llama.init_params(cfg, jax.random.key(10 + i), scale=0.3) for i in range(2)}
  windows = np.asarray(jax.random.randint(jax.random.key(1), (3, 16), 0, cfg.vocab_size))
  many = eval_lib.compare_many(params, others, cfg, windows, batch_size=2, progress=False)
  for name, p in others.items():
    one = eval_lib.compare(params, p, cfg, windows, batch_size=2, progress=False)
    for k in ('ppl', 'kl', 'top1'):
      np.testing.assert_allclose(many[name][k], one[k], rtol=1e-5)
    np.testing.assert_allclose(many['__ref__']['ppl'], one['ppl_ref'], rtol=1e-6)
