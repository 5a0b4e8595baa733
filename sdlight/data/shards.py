"""``data=webdataset data.urls=PATTERN``: tar shards in the img2dataset layout (``jpg|jpeg|png|webp`` image,
``txt`` caption, optional ``json`` and ``cls``), local or any URL webdataset opens.

Training draws shards with replacement (``ResampledShards``, seeded per rank and worker) through a shuffle
buffer, and ``with_epoch`` fixes each worker's number of batches: every rank gets the same known number of
batches per epoch, whatever was skipped, so Lightning sees epochs and no DDP rank waits on another.
Validation is a fixed list of the first ``val_size`` samples of ``val_urls`` (else of ``urls``, which training
then leaves out, and a run whose validation leaves fewer than one batch on every rank stops at setup), held as
encoded bytes and decoded like training images; being map-style, Lightning splits it over ranks with its
DistributedSampler.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import webdataset as wds
from torch.utils.data import Dataset

from sdlight.data.base import ImageDataModule, leaving
from sdlight.data.bucket_sampler import BucketBatches, bucket_counts, item_shape
from sdlight.data.buckets import choose_buckets
from sdlight.data.skips import (BROKEN_SHARDS, MAX_EXAMPLES, SKIPPED, SKIPPED_FROM, ReplacingDataset, TooManySkipped,
                                collate_counting_skips)
from sdlight.data.transforms import BadImage, ImageTransform
from sdlight.errors import UsageError

log = logging.getLogger("sdlight")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern (``shards-{0000..0099}.tar``), ``::``-separated patterns, or a list of either."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u for item in items for u in wds.shardlists.expand_urls(str(item))]
    if not out:
        raise UsageError(f"data.urls={urls!r}: no shards")
    return out


def sample_fields(sample: dict) -> tuple[bytes, str, int]:
    """(image bytes, caption, label) of a raw tar sample; raises BadImage when a part is missing."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise BadImage(f"no image ({'|'.join(IMAGE_KEYS)}) in the sample, only {sorted(_fields(sample))}")
    if "txt" not in sample:
        raise BadImage("no caption (txt)")
    text = sample["txt"].decode("utf-8", errors="replace").strip()
    label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
    return image, text, label


class ImageSample:
    """A raw tar sample → ``{image, text, label, key, original_size, crop_coords}``; raises BadImage / ValueError /
    OSError when broken. (A class, not a closure: DataLoader workers and DDP spawn pickle it.)"""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        image, text, label = sample_fields(sample)
        image, geometry = self.transform.with_geometry(image)
        return {"image": image, "text": text, "label": label, "key": sample["__key__"], **geometry}


def _fields(sample: dict) -> list[str]:
    return [k for k in sample if not k.startswith("__")]


def sample_name(sample: dict) -> str:
    return f"{os.path.basename(str(sample.get('__url__', '?')))}:{sample.get('__key__', '?')}"


class SkipCounting:
    """The stages of a shard reader that count what they drop; the counts ride on the next good item.

    A broken sample counts each time it is read. A tar that ends early or does not open is noted once per pass
    over the shards (the main process counts it once per epoch, sdlight.data.skips), with the partial sample a cut
    leaves behind, and with the samples it gave before the cut. Lives inside each DataLoader worker (a copy per
    worker), so nothing is shared between processes.
    """

    max_in_a_row = 1000  # resampled shards never end: without this, all-broken data would spin forever

    def __init__(self, load: Callable[[dict], dict], exclude: frozenset = frozenset()):
        self.load, self.exclude = load, exclude
        self.pending: list[str] = []                      # broken samples since the last good item
        self.broken_shards: list[tuple[str, str]] = []    # (url, what) not yet handed on
        self.in_a_row, self.first = 0, ""
        self.url, self.in_shard, self.cut = "", 0, None   # the tar being read, its samples so far, a tar just cut
        self.seen_shards: set[str] = set()

    def _bad(self, what: str) -> None:
        self.in_a_row += 1
        self.first = self.first or what
        if self.in_a_row >= self.max_in_a_row:
            raise TooManySkipped(f"data: {self.in_a_row} reads in a row gave no usable sample (broken samples or "
                                 f"tar shards that do not read), e.g. {self.first}")

    def handler(self, exn: Exception) -> bool:
        """webdataset's exception handler: a truncated tar or unreadable shard is noted, never raised."""
        why = str(exn.args[0]).split(" @ <")[0] if exn.args else ""  # webdataset appends the file object
        what = f"{self.url}: {type(exn).__name__}: {why} (after {self.in_shard} samples)"
        self._bad(what)
        self.cut = self.url
        if self.url not in self.seen_shards:
            self.seen_shards.add(self.url)
            self.broken_shards.append((self.url, what))
        return True

    def read(self, shards: Iterable[dict]) -> Iterator[dict]:
        """The raw samples of ``shards`` (webdataset's ``{"url": ...}`` dicts): one pass."""
        self.seen_shards = set()

        def noted() -> Iterator[dict]:
            for shard in shards:
                self.url, self.in_shard = shard["url"], 0
                yield shard

        for sample in wds.tarfile_samples(noted(), handler=self.handler):
            cut, self.cut = self.cut, None
            if sample.get("__url__") == cut:
                sample["__cut__"] = True  # the partial last sample of a tar that ended early
            elif sample.get("__url__") == self.url:
                self.in_shard += 1
            yield sample

    def broken(self, sample: dict, exc: Exception) -> str:
        """Counts a sample that does not load (a cut tar's partial sample is part of that tar's count); returns
        what it was."""
        what = f"{sample_name(sample)}: {exc}"
        if not sample.get("__cut__"):
            self.pending.append(what)
        return what

    def decode(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            if (sample.get("__url__"), sample.get("__key__")) in self.exclude:
                continue  # a validation sample
            try:
                item = self.load(sample)
            except (BadImage, ValueError, OSError) as exc:
                self._bad(self.broken(sample, exc))
                continue
            item[SKIPPED], item[SKIPPED_FROM] = len(self.pending), "\n".join(self.pending)
            item[BROKEN_SHARDS] = tuple(self.broken_shards)
            self.pending, self.broken_shards, self.in_a_row, self.first = [], [], 0, ""
            yield item


def iter_samples(urls: Sequence[str], counting: SkipCounting) -> Iterator[dict]:
    """The raw samples of ``urls`` in order, read in this process; tar errors noted by ``counting``."""
    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), counting.read)


def count_samples(urls: Sequence[str]) -> int:
    """Samples with an image in local shards, from the tar headers alone (no image is decoded)."""
    keys = set()
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if "://" in path or not os.path.isfile(path):
            raise UsageError(f"cannot count the samples of {url!r}: set data.train_size (samples per epoch)")
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    base, _, ext = member.name.partition(".")
                    if ext.lower() in IMAGE_KEYS:
                        keys.add((url, base))
        except (tarfile.TarError, OSError) as exc:
            log.warning("data: %s: %s (counted up to there)", url, exc)
    return len(keys)


class EncodedSamples(ReplacingDataset):
    """Raw samples held in memory, decoded on access; a broken one is replaced by the next."""

    errors = (BadImage, ValueError, OSError)

    def __init__(self, samples: list[dict], load: Callable[[dict], dict]):
        self.samples, self.load_sample = samples, load

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return sample_name(self.samples[index])

    def load(self, index: int) -> dict:
        return self.load_sample(self.samples[index])


class WebDataModule(ImageDataModule):
    """Shards for training (``urls``) and a fixed validation set (``val_urls`` or the head of ``urls``).

    ``train_size``: samples per epoch over all ranks (None: counted from local shards). ``val_size``: samples
    in the validation set (None: all of ``val_urls``; 256 from the head of ``urls``).
    """

    counts_skips = True
    collate_fn = staticmethod(collate_counting_skips)

    def __init__(self, urls: str | Sequence[str], val_urls: str | Sequence[str] | None = None,
                 shuffle_buffer: int = 1000, resampled: bool = True, crop: str = "random", flip: bool = False,
                 min_size: int = 0, seed: int = 0, buckets: str | None = None, bucket_step: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.buckets = buckets
        self.bucket_list = choose_buckets(buckets, self.image_size, bucket_step)
        self.urls = expand_urls(urls)
        self.val_urls = expand_urls(val_urls) if val_urls else None
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.crop, self.flip, self.min_size = crop, flip, min_size
        self._val_keys: frozenset = frozenset()
        self._head: dict[str, int] | None = None  # validation from the head of urls: held, read, left for training

    def _transform(self, split: str) -> ImageTransform:
        train = split == "train"
        return ImageTransform(self.image_size, crop=self.crop if train else "center", flip=self.flip and train,
                              min_size=self.min_size, buckets=self.bucket_list)

    @property
    def bucketed(self) -> bool:
        """Whether items come in several shapes, so that a batch gathers items of one shape."""
        return self.bucket_list is not None

    def sample_loader(self, split: str) -> Callable[[dict], dict]:
        """What turns a raw tar sample of ``split`` into a batch item (subclasses read other layouts)."""
        return ImageSample(self._transform(split))

    def count_samples(self) -> int:
        """Training samples in the local shards (for the epoch length when ``train_size`` is not given)."""
        return count_samples(self.urls)

    def _world(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def batches_per_worker(self) -> int:
        """Each worker's batches per epoch: ``train_size`` (else the samples of the shards less the validation
        ones taken from them) over ranks, workers and the batch size, rounded up (``with_epoch`` is per worker)."""
        n = self.train_size if self.train_size is not None else self.count_samples() - len(self._val_keys)
        per_rank = max(1, math.ceil(n / (self._world() * self.batch_size)))
        return math.ceil(per_rank / max(1, self.num_workers))

    def build(self, split: str) -> Dataset:
        if split == "val":
            return self._build_val()
        counting = SkipCounting(self.sample_loader("train"), self._val_keys)
        if self.resampled:
            shards = [wds.ResampledShards(self.urls, seed=self.seed, deterministic=True)]
        else:  # each shard once per pass, split over ranks and workers; with_epoch repeats the passes
            shards = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
            if len(self.urls) < self._world() * max(1, self.num_workers):
                log.warning("data: %d shards for %d ranks x %d workers: some read none (use resampled=true)",
                            len(self.urls), self._world(), max(1, self.num_workers))
        n = self.batches_per_worker()
        pipeline = wds.DataPipeline(
            *shards,
            counting.read,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100)),
            counting.decode,
            # with buckets: a pending list per shape, a batch when one fills (sdlight.data.bucket_sampler)
            BucketBatches(self.batch_size, collate_counting_skips) if self.bucketed else
            wds.batched(self.batch_size, collation_fn=collate_counting_skips, partial=False),
        )
        return pipeline.with_epoch(nbatches=n).with_length(n * max(1, self.num_workers), silent=True)

    def _build_val(self) -> Dataset:
        """Reads the validation samples once, decoding each to leave the broken ones out (and count them).

        Taken from the head of ``urls``, it reads on until one batch on every rank is left for training (never
        the whole set, which may be remote), so that setup can stop a run that would have nothing to train on.
        """
        load = self.sample_loader("val")
        counting = SkipCounting(load)
        limit = self.val_size if self.val_size is not None or self.val_urls else 256
        samples, shapes, read = [], [], 0
        stream = iter(iter_samples(self.val_urls or self.urls, counting))
        while limit is None or len(samples) < limit:
            sample = next(stream, None)
            if sample is None:
                break
            read += not sample.get("__cut__")
            try:
                shapes.append(item_shape(load(sample)))
                samples.append(sample)
            except (BadImage, ValueError, OSError) as exc:
                counting.broken(sample, exc)
        if not self.val_urls:
            self._val_keys = frozenset((s.get("__url__"), s.get("__key__")) for s in samples)
            with_image = (s for s in stream if any(k in s for k in IMAGE_KEYS))
            left = sum(1 for _ in itertools.islice(with_image, self.one_batch()[0]))
            self._head = {"held": len(samples), "read": read + left, "left": left}
        bad = counting.pending + [what for _, what in counting.broken_shards]
        if bad:
            self.skips.add(len(bad), len(bad) + len(samples), bad, shards=len(counting.broken_shards), reported=True)
            log.warning("data: %d broken samples or tar shards left out of the validation set, e.g. %s", len(bad),
                        "; ".join(bad[:MAX_EXAMPLES]))
        if not samples:
            log.warning("data: no validation samples in %s", (self.val_urls or self.urls)[:MAX_EXAMPLES])
        held = EncodedSamples(samples, load)
        if self.bucketed:  # batches of one shape (the validation loader reads bucket_of)
            held.bucket_of = shapes
            log.info("data: validation samples per shape: %s", bucket_counts(shapes))
        return held

    def check_training_left(self) -> None:
        """Stops a run whose validation samples, taken from the head of ``urls``, leave fewer training samples
        than one batch on every rank (none left: training would skip every sample it reads, forever)."""
        need, batch = self.one_batch()
        head = self._head
        if head is None or head["left"] >= need:
            return
        # the read reached the end of the shards: their count is exact
        total, size = head["read"], self.val_size if self.val_size is not None else "null (256)"
        fix = f"lower data.val_size to {total - need} or less" if total > need else "lower data.batch_size"
        shards = f"{len(self.urls)} shard" + ("s" if len(self.urls) > 1 else "")
        raise UsageError(f"data.val_size={size} holds out {head['held']} of the {total} samples in data.urls "
                         f"({shards}), {leaving(head['left'], batch)}: {fix}, or give a separate validation set with "
                         "data.val_urls")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:  # val first: training leaves out the samples it holds
            self.val_set = self.build("val")
            if stage in (None, "fit"):
                self.check_training_left()
            self.train_set = self.build("train")
        super().setup(stage)
