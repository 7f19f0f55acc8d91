"""The experts of a mixture solved as one stack (``compress.matrix.compress_matrices``), in
parallel over the devices.

Properties: the stacked solve gives every expert bit for bit the leaf that solving it alone
gives, for every one-matrix method (GPTQ with and without act-order, asymmetric GPTQ, SparseGPT
2:4 with and without joint GPTQ, Wanda 2:4, Wanda++, RTN, magnitude); the pipeline solves the
same linear of all experts of a block together and reports it; bad inputs are refused per
problem by name. (The same results on meshes of 8 simulated devices, with the expert axis split
over them: ``tests/test_mesh.py``.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import calibration, pipeline
from compress import matrix as matrix_lib
from compress import rules as rules_lib
from compress.prune import PruneSpec
from kernels.formats import QuantSpec
from models import config as config_lib
from models import llama

E, N_IN, N_OUT = 4, 64, 48
Q3 = QuantSpec(bits=3, group_size=16)
SPECS = {
    'gptq': rules_lib.LinearSpec(quant='gptq', qspec=Q3),
    'gptq act-order': rules_lib.LinearSpec(quant='gptq', qspec=Q3, act_order=True),
    'gptaq': rules_lib.LinearSpec(quant='gptq', qspec=Q3, asymmetric=True),
    'sparsegpt 2:4': rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4')),
    'sparsegpt 2:4 + gptq': rules_lib.LinearSpec(prune='sparsegpt', sparsity=PruneSpec.parse('2:4'),
                                                 quant='gptq', qspec=QuantSpec(bits=4, group_size=32)),
    'wanda 2:4': rules_lib.LinearSpec(prune='wanda', sparsity=PruneSpec.parse('2:4')),
    'wanda++ 50%': rules_lib.LinearSpec(prune='wanda++', sparsity=PruneSpec.parse('0.5')),
    'magnitude 50%': rules_lib.LinearSpec(prune='magnitude', sparsity=PruneSpec.parse('0.5')),
    'rtn': rules_lib.LinearSpec(quant='rtn', qspec=Q3),
}


def _problems(cross: bool):
  """``E`` weights and their statistics, each expert with inputs of its own scale."""
  rng = np.random.default_rng(0)
  ws = jnp.asarray(rng.standard_normal((E, N_IN, N_OUT)), jnp.float32)
  stats = []
  for _ in range(E):
    x = jnp.asarray(rng.standard_normal((160, N_IN)) * rng.uniform(0.3, 3.0, N_IN), jnp.float32)
    dense = x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32) if cross else None
    stats.append(calibration.update_stats(calibration.init_stats(N_IN, cross=cross), x,
                                          dense=dense))
  grads = jnp.asarray(np.abs(rng.standard_normal((E, N_IN, N_OUT))), jnp.float32)
  return ws, stats, grads


@pytest.mark.parametrize('name', list(SPECS))
def test_the_stack_gives_each_expert_its_own_solution_bit_for_bit(name):
  spec = SPECS[name]
  ws, stats, grads = _problems(cross=spec.asymmetric)
  g = grads if spec.prune == 'wanda++' else None
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
  leaves, infos = matrix_lib.compress_matrices(ws, stacked, spec, [f'e{e}' for e in range(E)], g)
  assert len(leaves) == len(infos) == E
  for e in range(E):
    ref, ref_info = matrix_lib.compress_matrix(ws[e], stats[e], spec, f'e{e}',
                                               None if g is None else g[e])
    assert infos[e] == ref_info
    assert jax.tree.structure(leaves[e]) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(leaves[e]), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_problem_is_checked_by_name():
  ws, stats, _ = _problems(cross=False)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
  with pytest.raises(ValueError, match='4 matrices but 3 names'):
    matrix_lib.compress_matrices(ws, stacked, SPECS['gptq'], ['a', 'b', 'c'])
  with pytest.raises(ValueError, match='e0: wanda\\+\\+ needs the regional gradient'):
    matrix_lib.compress_matrices(ws, stacked, SPECS['wanda++ 50%'], [f'e{e}' for e in range(E)])
  with pytest.raises(ValueError, match='e0: .*cross term'):
    matrix_lib.compress_matrices(ws, stacked, SPECS['gptaq'], [f'e{e}' for e in range(E)])


def test_the_pipeline_solves_the_experts_of_a_block_together():
  """Every expert linear of a 4-expert mixture is solved in a stack of 4 (gate and up side by
  side, down apart), and equals the expert compressed alone on its own routed statistics."""
  cfg = config_lib.tiny_config(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32)
  params = llama.init_params(cfg, jax.random.key(0), scale=0.1)
  calib = np.asarray(jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size))
  spec = SPECS['gptq']
  out, reports = pipeline.compress_model(params, cfg, calib, rules_lib.uniform(spec),
                                         progress=False, dense_inputs=True)
  experts = [r for r in reports if '/experts/' in r.name]
  assert len(experts) == cfg.num_layers * 4 * 3
  assert all(r.extra['experts_solved_together'] == 4 for r in experts)
  assert all('experts_solved_together' not in r.extra for r in reports if '/experts/' not in r.name)
  # Expert 2's down projection of block 0, alone on the dense block's routed statistics.
  stats = calibration.collect_stats(params['layers'][0], llama.embed(params, jnp.asarray(calib),
                                                                     cfg),
                                    cfg.layer(0), ['expert2_down_in'], 8)
  w = params['layers'][0]['mlp']['experts'][2]['down_proj']['kernel']
  ref, _ = matrix_lib.compress_matrix(w, stats['expert2_down_in'], spec)
  got = out['layers'][0]['mlp']['experts'][2]['down_proj']['kernel']
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
