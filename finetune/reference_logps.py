"""Reference log-probabilities computed once (`train.preference.precompute_reference`, TRL's
`precompute_ref_log_probs`): before training, the reference model's summed log-probability of each prepared
sequence's targets, over the train and validation splits. They are kept with the run (RunFolder.reference_logps)
and travel with the rows (`reference_logps`, one value per sequence, through PairCollator), so full fine-tuning
keeps no frozen copy of the model in memory and no step runs a reference forward.

The file is trusted only when its key matches: the prepared data's fingerprint and a digest of the reference's
weights, so a changed base or changed data computes them again. It is written under a temporary name and renamed,
so a killed run leaves the old file or none, never a part. With several processes the main one computes and
writes, then the others read; resuming reads the file the first run wrote.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import Dataset

from finetune.collate import PairCollator
from finetune.distributed import main_print
from finetune.loss import sequence_logps
from finetune.preference_trainer import reference_context
from finetune.run_folder import RunFolder
from finetune.store import TokenStore, write_atomic


def reference_weights_digest(model: torch.nn.Module) -> str:
    """A digest of the reference's weights as loaded (names, dtypes, bytes; a LoRA adapter's own weights left out:
    the reference is the model with the adapter off)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WithReference(Dataset):
    """A prepared split of pairs whose rows also carry `reference_logps`: the cached value of each of their
    sequences (a row's pieces are its sequences, TokenStore.row_span says which)."""

    def __init__(self, store: TokenStore, logps: np.ndarray) -> None:
        self.store, self.logps = store, logps

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first, end = self.store.row_span(int(index))
        return {**self.store[index], "reference_logps": self.logps[first:end]}


@torch.no_grad()
def compute(model: torch.nn.Module, store: TokenStore, collate: PairCollator, batch_size: int, chunk: int | None,
            device: torch.device) -> np.ndarray:
    """The reference log-probability of every sequence of `store`, in plan order (float32)."""
    out = np.zeros(store.info["pieces"], dtype=np.float32)
    training = model.training
    model.eval()
    for start in range(0, len(store), batch_size):
        indices = range(start, min(start + batch_size, len(store)))
        batch = {key: value.to(device) for key, value in collate([store[i] for i in indices]).items()}
        with reference_context(model):
            logps, _ = sequence_logps(model, batch, chunk)
        out[np.concatenate([np.arange(*store.row_span(i)) for i in indices])] = logps.cpu().numpy()
    model.train(training)
    return out


def read(path: Path, key: str, stores: dict[str, TokenStore]) -> dict[str, np.ndarray] | None:
    """The cached values when `path` holds them under `key`, one per sequence of each split; None otherwise."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                return None
            found = {split: saved[split] for split in stores}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if any(len(found[split]) != store.info["pieces"] for split, store in stores.items()):
        return None
    return found


def write(path: Path, key: str, values: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), **values)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def cached_reference_logps(run: RunFolder, fingerprint: str, model: torch.nn.Module, stores: dict[str, TokenStore],
                           collate: PairCollator, batch_size: int, chunk: int | None) -> dict[str, np.ndarray]:
    """Per split, the reference log-probability of each sequence: read from the run folder when its key (the
    prepared `fingerprint`, the weights of `model` with any adapter off) matches, else computed by the main process
    and written there."""
    state = PartialState()
    key = f"{fingerprint}:{reference_weights_digest(model)}"
    path = run.reference_logps
    with state.main_process_first():
        found = read(path, key, stores)
        if found is None and state.is_main_process:
            sequences = sum(store.info["pieces"] for store in stores.values())
            main_print(f"train: computing the reference log-probabilities of {sequences} sequences once "
                       "(train.preference.precompute_reference)")
            found = {split: compute(model.to(state.device), store, collate, batch_size, chunk, state.device)
                     for split, store in stores.items()}
            run.claim(path)
            write(path, key, found)
            main_print(f"train: wrote {path}")
    if found is None:
        raise RuntimeError(f"{path} holds no reference log-probabilities of this data and model after the main "
                           "process computed them: the processes see different run folders or models")
    return found
