"""The token store on its own: dtype choice, rows assembled from shards, validation routing when streaming."""

from __future__ import annotations

import numpy as np

from finetune.packing import IGNORE
from finetune.prepare import Router
from finetune.recipe import DataConfig, HubSource
from finetune.store import ShardData, TokenStore, finish_split, token_dtype, write_shard


def test_ids_are_uint16_while_the_vocabulary_fits_and_uint32_beyond():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_rows_cross_shards_with_uint32_ids_and_restart_at_each_piece(tmp_path):
    """Two shards of large ids, stream-packed into rows of 4: a row spanning the shard boundary is assembled from
    both, positions restart where a document (or a row's piece of one) begins, and no piece's first token is a
    target."""
    docs = [[70000, 70001, 70002], [70003, 70004], [70005, 70006, 70007, 70008]]
    entries = [write_shard(tmp_path, f"shard-{i}", ShardData(tokens=[np.array(d, dtype=np.uint32) for d in part],
                                                             docs=[np.array([len(d) for d in part], np.uint32)]))
               for i, part in enumerate((docs[:2], docs[2:]))]
    finish_split(tmp_path, entries, np.dtype(np.uint32), 4, stream=True, packing=True)
    store = TokenStore(tmp_path)
    rows = [{k: v.tolist() for k, v in row.items()} for row in store]
    assert [r["input_ids"] for r in rows] == [[70000, 70001, 70002, 70003], [70004, 70005, 70006, 70007], [70008]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0], [0, 0, 1, 2], [0]]
    assert [r["labels"] for r in rows] == [[IGNORE, 70001, 70002, IGNORE], [IGNORE, IGNORE, 70006, 70007], [IGNORE]]
    assert [d.tolist() for d in store.documents()] == docs


def test_a_streamed_carve_draws_the_same_rows_when_resumed_mid_way():
    """A streamed Hub data set has no known size: each row is drawn; a resumed prepare replays the draws."""
    source = HubSource(hub="user/corpus")
    cfg = DataConfig(train=source, validation_fraction=0.3, seed=7, streaming=True)
    whole = Router(source, cfg, "carve")
    straight = np.concatenate([whole.flags(0, 50), whole.flags(50, 50)])
    resumed = Router(source, cfg, "carve")
    assert 10 < straight.sum() < 50
    assert (resumed.flags(50, 50) == straight[50:]).all()
    assert (whole.flags(0, 50) == straight[:50]).all()  # a second read of the source (after tokenizer training)
