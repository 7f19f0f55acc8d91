"""The 'hf' export is proven by loading it with transformers itself and matching our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from kernels import QuantSpec
from models import config as config_lib
from models import export
from models import llama
from models import loading
from models import tree
from recover import compensate

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def recovered():
  """A tiny model, GPTQ 3-bit with rank-8 EoRA adapters (every leaf a CompressedLinear)."""
  cfg = config_lib.tiny_config(num_layers=2, tie_word_embeddings=False)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=3, group_size=32))
  out, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False,
                                   recovery=compensate.Compensator(method='eora', rank=8))
  return cfg, out, calib


def _hf_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize('merge', [True, False], ids=['adapters_merged', 'adapters_left_out'])
def test_transformers_loads_the_export_and_matches_our_logits(recovered, tmp_path, merge):
  cfg, params, calib = recovered
  path = export.save_hf(tmp_path / 'hf', params, cfg, merge_adapters=merge)
  ours = params if merge else tree.strip_adapters(params)
  want = np.asarray(llama.forward(ours, jnp.asarray(calib[:2]), cfg))
  got = _hf_logits(path, calib[:2])
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  # Our own loader reads it back to the same dense model.
  _, back = loading.load_hf_dir(path)
  np.testing.assert_allclose(np.asarray(llama.forward(back, jnp.asarray(calib[:2]), cfg)), want,
                             atol=1e-5, rtol=0)
  assert not (tmp_path / 'hf.tmp').exists()


def test_merged_and_base_exports_differ_by_the_adapters(recovered, tmp_path):
  cfg, params, _ = recovered
  merged = export.hf_state_dict(params, cfg, merge_adapters=True)
  base = export.hf_state_dict(params, cfg, merge_adapters=False)
  leaf = tree.get_linear(params['layers'][1], 'mlp/down_proj')
  delta = np.asarray(leaf.adapter.a @ leaf.adapter.b).T
  name = 'model.layers.1.mlp.down_proj.weight'
  np.testing.assert_allclose(merged[name] - base[name], delta, atol=1e-5)
  assert merged[name].shape == (cfg.hidden_size, cfg.intermediate_size)


def test_bad_output_folder_is_refused_before_writing(recovered, tmp_path):
  cfg, params, _ = recovered
  out = tmp_path / 'busy'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(export.ExportError, match='is not empty; pass --overwrite'):
    export.save_hf(out, params, cfg)
  assert sorted(p.name for p in out.iterdir()) == ['keep.txt']
  export.save_hf(out, params, cfg, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(export.ExportError, match='not a directory'):
    export.save_hf(tmp_path / 'a_file', params, cfg)


@pytest.mark.parametrize('adapter_bits', [16, 4], ids=['float_adapters', 'quantized_adapters'])
def test_peft_loads_the_adapters_on_the_base_export(recovered, tmp_path, adapter_bits):
  """The 'peft' adapters on the 'hf' base (adapters left out), loaded with peft itself, give our
  recovered model's logits; per-layer ranks that differ go through rank_pattern."""
  peft = pytest.importorskip('peft')
  cfg, params, calib = recovered
  if adapter_bits != 16:
    params = compensate.quantize_adapters(params, adapter_bits, 8)
  # A lower rank on one linear exercises rank_pattern / alpha_pattern.
  leaf = tree.get_linear(params['layers'][0], 'self_attn/q_proj')
  params = tree.replace_leaves(params, {'layers/0/self_attn/q_proj/kernel': (
      compensate.truncate_adapters({'x': leaf}, 4)['x'] if adapter_bits == 16 else leaf)})
  base = export.save_hf(tmp_path / 'base', params, cfg, merge_adapters=False)
  adapter = export.save_peft(tmp_path / 'adapter', params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
  with torch.no_grad():
    got = model(torch.as_tensor(np.array(calib[:2]), dtype=torch.long)).logits.numpy()
  want = np.asarray(llama.forward(params, jnp.asarray(calib[:2]), cfg))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  # Without the adapters the logits are the base's, which differ.
  assert np.abs(_hf_logits(base, calib[:2]) - want).max() > 1e-2


def test_peft_export_needs_adapters(recovered, tmp_path):
  cfg, params, _ = recovered
  with pytest.raises(export.ExportError, match='no low-rank adapters'):
    export.save_peft(tmp_path / 'a', tree.strip_adapters(params))
  assert not (tmp_path / 'a').exists()
