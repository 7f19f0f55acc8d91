"""Blocks left on disk (:class:`models.loading.LazyLayers`, what ``--stream`` reads): each block
read on demand is the block of the whole-model load, from sharded safetensors and from GGUF; the
digest names the checkpoint without reading its weights; bad files are refused; the pipeline
gives the whole-model result, resumes, and hands finished blocks to host memory."""

import json

import jax
import numpy as np
import pytest

from compress import pipeline
from compress import rules as rules_lib
from experiments import tiny_families as families
from kernels import QuantSpec
from models import checkpoint
from models import loading

GPTQ4 = rules_lib.LinearSpec(quant='gptq', qspec=QuantSpec(bits=4, group_size=32))


def _equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(x), np.asarray(y))
                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  path = families.save('llama', tmp_path_factory.mktemp('lazy') / 'llama', max_shard_size='40KB',
                       num_hidden_layers=3)
  assert (path / 'model.safetensors.index.json').exists() and len(list(path.glob('*.safetensors'))) > 2
  return path


@pytest.mark.parametrize('family', ['phi3', 'qwen2_moe'])
def test_lazy_blocks_of_other_families_are_the_eager_blocks(family, tmp_path):
  path = families.save(family, tmp_path / family, max_shard_size='40KB')
  _, eager = loading.load_hf_dir(path)
  _, lazy = loading.load_hf_dir(path, lazy=True)
  for i in range(len(eager['layers'])):
    assert _equal(lazy['layers'][i], eager['layers'][i]), i


def test_lazy_blocks_are_the_eager_blocks(sharded):
  cfg, eager = loading.load_hf_dir(sharded)
  cfg2, lazy = loading.load_hf_dir(sharded, lazy=True)
  layers = lazy['layers']
  assert cfg2 == cfg and isinstance(layers, loading.LazyLayers) and len(layers) == cfg.num_layers
  assert _equal({k: v for k, v in lazy.items() if k != 'layers'},
                {k: v for k, v in eager.items() if k != 'layers'})
  for i in range(cfg.num_layers):
    block = layers[i]
    assert _equal(block, eager['layers'][i]), i
    shapes = jax.tree.map(lambda x: x.shape, layers.abstract(i))
    assert shapes == jax.tree.map(lambda x: x.shape, block)
  assert _equal(layers[-1], eager['layers'][-1])
  with pytest.raises(IndexError):
    layers[cfg.num_layers]  # pylint: disable=pointless-statement


def test_lazy_gguf_blocks_are_the_eager_blocks():
  eager = loading.load_model('smollm2-135m')
  lazy = loading.load_model('smollm2-135m', lazy=True)
  assert isinstance(lazy.params['layers'], loading.LazyLayers)
  assert _equal(lazy.params['embed_tokens'], eager.params['embed_tokens'])
  for i in (0, 17, 29):
    assert _equal(lazy.params['layers'][i], eager.params['layers'][i]), i


def test_the_digest_names_the_checkpoint_without_reading_it(sharded, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'copy'
  shutil.copytree(sharded, copy)
  digest = lambda: checkpoint.tree_digest(loading.load_hf_dir(copy, lazy=True)[1])  # noqa: E731
  first = digest()
  assert digest() == first
  shard = next(f for f in sorted(copy.glob('*.safetensors'))
               if any(k.startswith('model.layers.') for k in load_file(f)))
  tensors = load_file(shard)
  name = next(k for k in tensors if k.startswith('model.layers.'))
  tensors[name] = tensors[name] * 2
  save_file(tensors, shard, metadata={'format': 'pt'})
  assert digest() != first


def test_bad_files_are_refused_by_name(sharded, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'cut'
  shutil.copytree(sharded, copy)
  shard = sorted(copy.glob('*.safetensors'))[-1]
  shard.write_bytes(shard.read_bytes()[:-16])  # cut short
  with pytest.raises(ValueError, match='corrupt safetensors file .*does not fit'):
    loading.load_hf_dir(copy, lazy=True)
  shard.write_bytes(b'\xff' * 8 + b'{}')
  with pytest.raises(ValueError, match='corrupt safetensors file .*header'):
    loading.load_hf_dir(copy)
  index = json.loads((sharded / 'model.safetensors.index.json').read_text())
  missing = tmp_path / 'missing'
  shutil.copytree(sharded, missing)
  dropped = next(k for k in index['weight_map'] if k.startswith('model.layers.1.'))
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  f = missing / index['weight_map'][dropped]
  tensors = load_file(f)
  del tensors[dropped]
  save_file(tensors, f, metadata={'format': 'pt'})
  _, lazy = loading.load_hf_dir(missing, lazy=True)  # found when block 1 is read, not before
  lazy['layers'][0]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match='missing tensors.*layers/1/'):
    lazy['layers'][1]  # pylint: disable=pointless-statement


def test_streamed_compression_is_the_whole_model_compression_and_resumes(sharded, tmp_path):
  cfg, eager = loading.load_hf_dir(sharded)
  _, lazy = loading.load_hf_dir(sharded, lazy=True)
  calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
  rules = rules_lib.uniform(GPTQ4)
  ref, ref_reports = pipeline.compress_model(eager, cfg, calib, rules, progress=False)
  out, reports = pipeline.compress_model(lazy, cfg, calib, rules, progress=False, host_blocks=True)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(out['layers']))
  assert _equal(out['layers'], ref['layers'])
  assert [r.rel_error for r in reports] == [r.rel_error for r in ref_reports]
  ckpt = tmp_path / 'ckpt'
  pipeline.compress_model(lazy, cfg, calib, rules, progress=False, host_blocks=True,
                          checkpoint_dir=str(ckpt), checkpoint_every_s=0, stop_after=1)
  resumed, _ = pipeline.compress_model(lazy, cfg, calib, rules, progress=False, host_blocks=True,
                                       checkpoint_dir=str(ckpt), checkpoint_every_s=0)
  assert _equal(resumed['layers'], ref['layers'])
