"""``--export=hf`` on the main command and ``experiments.export`` from a run's directory: the
exports load in transformers and give the saved model's logits."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compress_lib, config
from experiments import export as export_cli
from models import checkpoint, export, llama

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _hf_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


def test_run_export_and_export_from_a_run(tmp_path):
  rng = np.random.default_rng(0)
  words = ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'compress', 'recover', 'layer']
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(' '.join(rng.choice(words, size=6000)) + '\n')
  c = config.CompressConfig(model='tiny-llama', calib_data=str(corpus), calib_samples=4,
                            calib_seqlen=32, eval_data=(str(corpus),), eval_seqlen=32,
                            eval_windows=2, probes='none', batch_size=2, quant='gptq', bits=3,
                            group_size=32, recover='eora', rank=8, export='hf')
  out = tmp_path / 'run'
  res = compress_lib.run(c, out_dir=str(out), save=str(tmp_path / 'saved'))
  (out / 'results.json').write_text(json.dumps({'saved_to': res['saved_to']}))
  cfg, saved, _ = checkpoint.load_model(tmp_path / 'saved')
  tokens = np.arange(24)[None] % cfg.vocab_size
  want = np.asarray(llama.forward(saved, jnp.asarray(tokens), cfg))
  np.testing.assert_allclose(_hf_logits(res['exported_to'], tokens), want, atol=2e-4, rtol=0)
  # The stand-alone command from the run's directory writes the same export.
  path = export_cli.run(source=str(out), fmt='hf', out=str(tmp_path / 'again'))
  np.testing.assert_allclose(_hf_logits(path, tokens), want, atol=2e-4, rtol=0)
  with pytest.raises(export.ExportError, match='not empty'):
    export_cli.run(source=str(out), fmt='hf', out=str(tmp_path / 'again'))
  with pytest.raises(export.ExportError, match="--format='gguf'"):
    export_cli.run(source=str(out), fmt='gguf', out=str(tmp_path / 'third'))


def test_peft_format_writes_base_and_adapter(tmp_path):
  """``--format=peft`` from a --save directory: peft on the base gives the saved model's logits."""
  peft = pytest.importorskip('peft')
  import jax  # pylint: disable=g-import-not-at-top
  from compress import pipeline, rules as rules_lib  # pylint: disable=g-import-not-at-top
  from kernels import QuantSpec  # pylint: disable=g-import-not-at-top
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  from recover import compensate  # pylint: disable=g-import-not-at-top
  cfg = config_lib.tiny_config(num_layers=2)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = rules_lib.LinearSpec(quant='rtn', qspec=QuantSpec(bits=3, group_size=32))
  model, _ = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec), progress=False,
                                     recovery=compensate.Compensator(method='svd', rank=4))
  checkpoint.save_model(tmp_path / 'saved', model, cfg, {'model': 'tiny-llama'})
  out = export_cli.run(source=str(tmp_path / 'saved'), fmt='peft', out=str(tmp_path / 'p'))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / 'base'), torch_dtype=torch.float32)
  hf = peft.PeftModel.from_pretrained(hf, str(out / 'adapter')).eval()
  with torch.no_grad():
    got = hf(torch.as_tensor(np.array(calib[:2]), dtype=torch.long)).logits.numpy()
  want = np.asarray(llama.forward(model, jnp.asarray(calib[:2]), cfg))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_packed_exports_from_the_main_command_and_from_a_saved_model(tmp_path):
  """``--export=peft --peft_base=gptq`` on the main command writes a GPTQ base and the EoRA
  adapters; ``experiments.export --format=compressed-tensors --nomerge_adapters`` of the saved
  model writes its packed weights. Both read back to the saved model's codes (the third-party
  loaders are proven on these formats in tests/models/test_export_gptq.py and _ct.py)."""
  from models import loading  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(' '.join(np.random.default_rng(0).choice(
      ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'layer'], size=4000)) + '\n')
  c = config.CompressConfig(model='tiny-llama', calib_data=str(corpus), calib_samples=4,
                            calib_seqlen=32, eval_data=(str(corpus),), eval_seqlen=32,
                            eval_windows=2, probes='none', batch_size=2, quant='gptq', bits=4,
                            group_size=32, recover='eora', rank=8, export='peft',
                            peft_base='gptq')
  out = tmp_path / 'run'
  res = compress_lib.run(c, out_dir=str(out), save=str(tmp_path / 'saved'))
  base = pathlib.Path(res['exported_to']) / 'base'
  assert json.loads((base / 'config.json').read_text())['quantization_config'][
      'quant_method'] == 'gptq'
  assert (pathlib.Path(res['exported_to']) / 'adapter' / 'adapter_config.json').exists()
  _, saved, _ = checkpoint.load_model(tmp_path / 'saved')
  _, back = loading.load_hf_dir(base)
  leaf = saved['layers'][1]['mlp']['down_proj']['kernel']
  np.testing.assert_array_equal(
      np.asarray(back['layers'][1]['mlp']['down_proj']['kernel'].weight.ints()),
      np.asarray(leaf.weight.ints()))
  with pytest.raises(export.ExportError, match='cannot be merged into compressed-tensors'):
    export_cli.run(source=str(tmp_path / 'saved'), fmt='compressed-tensors',
                   out=str(tmp_path / 'ct'))
  path = export_cli.run(source=str(tmp_path / 'saved'), fmt='compressed-tensors',
                        out=str(tmp_path / 'ct'), merge_adapters=False)
  _, back = loading.load_hf_dir(path)
  np.testing.assert_array_equal(
      np.asarray(back['layers'][1]['mlp']['down_proj']['kernel'].weight.ints()),
      np.asarray(leaf.weight.ints()))


def test_eora_on_a_model_quantized_elsewhere(tmp_path):
  """``--compressed=DIR`` takes the packed linears of a GPTQ checkpoint (here our own export,
  which third-party loaders read: tests/models/test_export_gptq.py) and adds EoRA against the
  dense model: the same numbers as compressing and compensating in one run, up to the float16
  scales of the format."""
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(' '.join(np.random.default_rng(0).choice(
      ['the', 'model', 'weight', 'is', 'a', 'of', 'and', 'layer'], size=4000)) + '\n')
  base = dict(model='tiny-llama', calib_data=str(corpus), calib_samples=4, calib_seqlen=32,
              eval_data=(str(corpus),), eval_seqlen=32, eval_windows=2, probes='none',
              batch_size=2)
  one = compress_lib.run(config.CompressConfig(**base, quant='gptq', bits=3, group_size=32,
                                               recover='eora',
                                               rank=8, export='peft', peft_base='gptq'),
                         out_dir=str(tmp_path / 'one'))
  gptq_dir = pathlib.Path(one['exported_to']) / 'base'
  two = compress_lib.run(config.CompressConfig(**base, compressed=str(gptq_dir), recover='eora',
                                               rank=8), out_dir=str(tmp_path / 'two'))
  assert two['method'].startswith('given (')
  for key in ('ppl_dense', 'ppl_compressed', 'ppl_recovered'):
    np.testing.assert_allclose(two[key], one[key], rtol=2e-3)
  assert two['layers'][0]['rel_error_recovered'] < two['layers'][0]['rel_error']
  problems = config.validate(config.CompressConfig(**base, compressed=str(gptq_dir), quant='rtn'),
                             out_dir=str(tmp_path / 'three'))
  assert any('would compress again' in p for p in problems), problems
  problems = config.validate(config.CompressConfig(**base, compressed=str(tmp_path / 'none')),
                             out_dir=str(tmp_path / 'three'))
  assert any(p.startswith('--compressed=') for p in problems), problems
