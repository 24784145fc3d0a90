"""What a long training run needs, whichever stage it trains: both training scripts import this file.

    training.distributed(run, args)      torchrun's process group (or one process), set up and torn down
    training.train_loop(...)             the loop: a step, the progress line, measurements, checkpoints
    training.main(run)                   the one-line errors, the exit status of a signal

One process per GPU under torchrun (DDP over NCCL, gloo on CPUs), or a single process. --out holds one run; its
checkpoints hold state_dicts and plain data only (read with torch.load(weights_only=True)). SIGTERM (what SLURM and
Kubernetes send before they kill a job) or Ctrl-C stops every rank at the same step with a checkpoint written.

Needs: model.py (CheckpointError, reading checkpoints), losses.py (LPIPSUnavailable) and data.py (the streams).
"""

import _thread
import contextlib
import datetime
import glob
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import cli
import data
import losses
import model


# ----------------------------------------------------------------------------------------------------
# Set-up: errors the user can fix, processes and devices, the options both stages share


class TrainingError(Exception):
    """A problem the user can fix (an incompatible resume, a diverged run, a full disk): one line, exit 2, as a
    checkpoint that cannot be read (model.CheckpointError)."""


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def distributed(run, *args):
    """run(*args, rank, world, device) in a torchrun job (or alone); the process group is torn down however it ends."""
    rank, world, device = setup_distributed()
    try:
        return run(*args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def unwrap(net):
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def add_run_args(group, what):
    """--out's neighbours: resuming, snapshots (in steps, both stages), the log, the precision."""
    group.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto = bf16 autocast on GPUs that have it, fp32 elsewhere")
    group.add_argument("--resume", default=None, help="a checkpoint of this run, or 'auto' for the latest in --out "
                       "(fresh start if none); an earlier one rolls the run back")
    group.add_argument("--new-data", action="store_true", help=f"with --resume: keep {what}, the optimisers and "
                       "the step, and start fresh seeded data streams (the data changed since the checkpoint)")
    group.add_argument("--snap-every", type=cli.POSITIVE_INT, default=2000,
                       help="steps between sample grids and checkpoints")
    group.add_argument("--keep", type=cli.POSITIVE_INT, default=3, help="checkpoints kept")
    group.add_argument("--log-every", type=cli.NON_NEGATIVE, default=10.0, help="seconds between progress lines")
    group.add_argument("--tensorboard", action="store_true", help="also write the progress numbers and the sample "
                       "grids as TensorBoard event files in --out (needs pip install tensorboard)")


# ----------------------------------------------------------------------------------------------------
# Where a run writes, and how it resumes: checkpoints (atomic, rotated), RNGs, data streams, rollback


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint-{step:08d}.pt")


def checkpoint_step(path):
    return int(re.search(r"-(\d{8})\.\w+$", path)[1])


def save_checkpoint(payload, path, keep=None):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a run killed at any moment
    leaves the previous checkpoint intact and never a half-written file under a checkpoint's name. A write that
    fails (disk full, quota, --out removed or read-only) is a TrainingError: training on without a way back would
    only lose more work. Only the last `keep` checkpoint-STEP.pt stay (None: rotate nothing, for other files)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        previous = [p for p in model.list_checkpoints(os.path.dirname(path)) if p != path]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingError(f"cannot write {path} ({model.short_error(error)}): {kept}; free space or fix the "
                            "folder, then continue with --resume auto") from None
    finally:
        with contextlib.suppress(OSError):  # gone already after os.replace
            os.remove(tmp)
    if keep:
        for old in model.list_checkpoints(os.path.dirname(path))[:-keep]:
            os.remove(old)


def writable_folder(path):
    """Create --out and check that a file can be written there, before any training is spent."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise TrainingError(f"--out {path}: cannot write there ({model.short_error(error)}); pass a writable "
                            "folder") from None


def check_out_apart(out, *folders):
    """--out must not lie inside a folder the run reads (its sample grids would become training images)."""
    for option, folder in folders:
        if folder and folder != "demo" and os.path.isdir(folder) and data.inside(out, folder):
            raise TrainingError(f"--out {out} lies inside {option} {folder}: the sample grids written there would "
                                "be read as images; pass an --out outside the data")


def find_resume(args):
    """The checkpoint to resume from: --resume, for 'auto' the latest in --out, or None (a fresh start). A run never
    writes among another run's checkpoints (rotation would remove them, --resume auto would mix the two): a fresh
    start into an --out that holds some, or a resume from another folder into one, is a TrainingError."""
    found = model.list_checkpoints(args.out)
    resume = (found[-1] if found else None) if args.resume == "auto" else args.resume
    elsewhere = resume and os.path.isfile(resume) and not os.path.samefile(os.path.dirname(os.path.abspath(resume)),
                                                                         args.out)
    if found and (not resume or elsewhere):
        raise TrainingError(f"--out {args.out} holds the checkpoints of another run (the latest {found[-1]}): "
                            "continue it with --resume auto (or one of its checkpoints), or pass another --out")
    if args.new_data and not resume:
        raise TrainingError("--new-data continues a run over changed data: pass it with --resume (no checkpoint "
                            f"found in {args.out})")
    return resume


def gathered_rng_states(world):
    """Every rank's RNG states, for the checkpoint (rank 0 writes them all)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(saved, rank, world, seed, step):
    """This rank's RNGs as the checkpoint left them; with another number of processes, fresh ones distinct per rank."""
    if len(saved) == world:
        torch.set_rng_state(saved[rank]["torch"])
        random.setstate(saved[rank]["python"])
        if saved[rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved[rank]["cuda"])
    else:
        torch.manual_seed(seed + rank + 7919 * step)
        random.seed(seed + rank + 7919 * step)


def open_streams(args, labeled, unlabeled, rank, world, seed):
    """The labeled and the unlabeled stream, seeded (`seed`, and `seed` + 1)."""
    return (data.InfiniteLoader(labeled, args.batch, seed=seed, rank=rank, world_size=world, workers=args.workers,
                                name="labeled pairs"),
            data.InfiniteLoader(unlabeled, args.batch, seed=seed + 1, rank=rank, world_size=world,
                                workers=args.workers, name="unlabeled pool", max_unreadable=args.max_unreadable))


def resumed_streams(args, saved, labeled, unlabeled, rank, world):
    """The data streams of a resumed run: where checkpoint `saved` left them, or with --new-data fresh ones
    over the data as it is now, seeded by the step."""
    if args.new_data:
        return open_streams(args, labeled, unlabeled, rank, world, args.seed + 7919 * saved["step"])
    streams = open_streams(args, labeled, unlabeled, rank, world, args.seed)
    for stream, key in zip(streams, ("labeled_stream", "unlabeled_stream")):
        stream.load_state_dict(saved[key])
    return streams


def set_aside_later_snapshots(out, step, also=()):
    """Resuming from a checkpoint older than the latest in --out (rolling back) makes the later snapshots
    another run's: they move to OUT/abandoned-after-STEP/ (checkpoints, grids, the log's later records, and
    the files of `also`, e.g. model.pt, when they were written later), so that rotation and --resume auto
    follow the run that goes on and nothing is lost. Returns that folder, or None when there was none."""
    later = [p for p in model.list_checkpoints(out) if checkpoint_step(p) > step]
    if not later:
        return None
    aside, n = os.path.join(out, f"abandoned-after-{step:08d}"), 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(out, f"abandoned-after-{step:08d}-{n}")
    os.makedirs(aside)
    grids = [p for p in glob.glob(os.path.join(out, "samples-*.png"))
             if re.fullmatch(r"samples-\d{8}\.png", os.path.basename(p)) and checkpoint_step(p) > step]
    also = [os.path.join(out, name) for name in also]
    written_later = [p for p in also if os.path.isfile(p) and model.load_checkpoint(p).get("step", 0) > step]
    for path in later + grids + written_later:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    log = os.path.join(out, "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            records = [(json.loads(line).get("step", 0) <= step, line) for line in f]
        with open(os.path.join(aside, "log.jsonl"), "w") as f:
            f.writelines(line for kept, line in records if not kept)
        with open(log + ".tmp", "w") as f:
            f.writelines(line for kept, line in records if kept)
        os.replace(log + ".tmp", log)
    return aside


def resumed(args, resume, step, rank, also=()):
    """Say where the run resumed, and move a rolled-back run's later snapshots aside (rank 0)."""
    if rank == 0:
        fresh = " with fresh data streams (--new-data)" if args.new_data else ""
        print(f"resumed from {resume} at step {step}{fresh}", flush=True)
        aside = set_aside_later_snapshots(args.out, step, also)
        if aside:
            print(f"rolled back: the later snapshots of {args.out} moved to {aside}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Stopping on a signal, every rank at the same step


class Stopped(Exception):
    """The run stopped on a signal (main() reports it and exits 128 + signal): after writing a checkpoint
    at `step`, or, with step None, without one because the step under way did not end (StopOnSignal)."""

    def __init__(self, signum, step=None, out=None, waited=None):
        by = signal.Signals(signum).name if signum else "a signal to another process"
        where = (f" at step {step}: checkpoint {checkpoint_path(out, step)} written" if step is not None else
                 f": the step under way had not ended {waited:.0f} s later, so no checkpoint was written (the last "
                 "one is intact)")
        super().__init__(f"stopped by {by}{where}; continue with --resume auto")
        self.signum = signum or signal.SIGTERM


class StopOnSignal:
    """SIGTERM and SIGINT ask the run to stop after the current step (`signum` is then set); a second Ctrl-C stops at
    once (KeyboardInterrupt; the last checkpoint stays). The loaders' workers ignore both
    (data.leave_signals_to_the_main_process): a signal sent to the whole job, as SLURM sends it, leaves them running
    until the checkpoint is written.

    A step that cannot end (a loader that never delivers, a wait that never returns) must not make the process deaf:
    after the first signal a watchdog thread interrupts the main thread (Stopped, no checkpoint) once a step has run
    on for GRACE seconds since the signal, or 3 times the longest step so far if that is longer. It watches the
    steps only (step_started() to step_ended()), never what the loop does between them (validation, checkpoints,
    grids: a snapshot that takes its time is written whole), and its interrupt acts only if a step is still under
    way and the watchdog still armed when it arrives (disarm() once the loop has agreed to stop). It cannot
    interrupt a wait inside C code (a collective whose peer died, a read from a hung file system): Python acts on a
    signal only between its own instructions."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    GRACE = 60.0

    def __init__(self):
        self.signum, self.previous, self.pid = None, {}, os.getpid()
        self.signalled_at = self.step_start = time.monotonic()
        self.in_step, self.longest_step, self.disarmed, self.expired, self.fired = False, 0.0, False, None, False
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}

    def handler(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker (it inherited the handler): the main process decides
            return
        if self.fired:  # the watchdog's interrupt: act only if the step is still under way
            self.fired = False
            if self.in_step and not self.disarmed:
                raise Stopped(self.signum, waited=self.expired)
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:  # nothing printed here: the handler may interrupt a print
            self.signum, self.signalled_at = signum, time.monotonic()
            threading.Thread(target=self.watch, daemon=True).start()

    def step_started(self):
        self.step_start, self.in_step = time.monotonic(), True

    def step_ended(self):
        """Record the end of a step; returns the signal received so far, or None."""
        self.in_step = False
        self.longest_step = max(self.longest_step, time.monotonic() - self.step_start)
        return self.signum

    def watch(self):
        while not self.disarmed:
            waited = time.monotonic() - max(self.signalled_at, self.step_start)
            if self.in_step and not self.fired and waited > max(self.GRACE, 3 * self.longest_step):
                self.expired, self.fired = waited, True
                _thread.interrupt_main()  # SIGINT's handler (this one) runs in the main thread
            time.sleep(0.1)

    def disarm(self):
        self.disarmed = True

    def restore(self):
        self.disarm()
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Agreement:
    """Decisions that every rank must take at the same step though each has its own clock and signals (stop now? report
    now?). Each step every rank all-reduces (MAX) its flags and reads the result one step later: all ranks act at
    the same step, one after the first rank wanted to, and the host never waits for the GPU (the flags come back to
    pinned memory behind the step that produced them, long finished when they are read). One process: at once."""

    def __init__(self, world, device, count):
        self.world, self.device = world, device
        pin = device.type == "cuda"
        self.send, self.receive = torch.zeros(count, pin_memory=pin), torch.zeros(count, pin_memory=pin)
        self.done = None  # the CUDA event after the last exchange (True on the CPU, where it is synchronous)

    def __call__(self, *flags):
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        agreed = (False,) * len(flags)
        if self.done is not None:
            if self.done is not True:
                self.done.synchronize()
            agreed = tuple(v > 0 for v in self.receive.tolist())
        self.send.copy_(torch.tensor([float(bool(f)) for f in flags]))
        exchanged = self.send.to(self.device, non_blocking=True)
        dist.all_reduce(exchanged, op=dist.ReduceOp.MAX)
        self.receive.copy_(exchanged, non_blocking=True)
        self.done = True
        if self.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()
        return agreed


# ----------------------------------------------------------------------------------------------------
# Progress: the line on the console, log.jsonl and TensorBoard


def warn_unreadable(stream, first=5):
    """Name the first few unreadable pool images on stderr; past them, the progress line counts them."""
    already = stream.reported
    for count, (path, reason) in enumerate(stream.new_unreadable(), start=already + 1):
        if count <= first:
            print(f"warning: {reason}; replaced by another image of the pool", file=sys.stderr, flush=True)
        if count == first:
            print("warning: further unreadable images are only counted: progress line and log.jsonl "
                  "(unreadable_images)", file=sys.stderr, flush=True)


def tensorboard_writer(args, rank, step):
    """--tensorboard: a SummaryWriter into --out on rank 0 (None on the others, or without the option), whose event
    files get what log.jsonl gets and the sample grids. Without the tensorboard package, a TrainingError (one line)
    on every rank before training starts; the package stays optional (not in requirements.txt)."""
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if rank != 0:
        return None
    # a resumed run logs the steps after its checkpoint again: TensorBoard hides the stopped run's (purge_step)
    return SummaryWriter(args.out, purge_step=step or None)


class Progress:
    """Sums the losses on the device (no synchronisation per step) and reports every --log-every seconds: a line on the
    console, the same numbers as a JSON line in OUT/log.jsonl with the wall-clock time ("time", ISO 8601 with the
    UTC offset) and the seconds of training so far ("elapsed": a resumed run continues from its checkpoint's, the
    time it was stopped not counted), and to TensorBoard when a writer is given (--tensorboard)."""

    def __init__(self, path, global_batch, total_steps, start_step, device, elapsed=0.0, tensorboard=None):
        self.path, self.global_batch, self.total_steps, self.device = path, global_batch, total_steps, device
        self.sums, self.counts, self.measured = {}, {}, set()
        self.last_time, self.last_step = time.time(), start_step
        self.started, self.tensorboard = self.last_time - elapsed, tensorboard

    def elapsed(self):
        return time.time() - self.started

    def add(self, values, measured=False):
        """Losses, or with `measured` numbers that measure the run (the masks' quality, validation scores):
        a loss that is not finite stops the run, a measurement is logged (null in log.jsonl) and the run
        goes on: a collapsed mask branch is what mask_parts exists to report, not a reason to stop."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
            if measured:
                self.measured.add(k)

    def averages(self):
        """The mean of each loss since the last report. Synchronises with the device."""
        return {k: (v / self.counts[k]).item() for k, v in self.sums.items()}

    def report(self, step, rank, world, counts=None):
        """Called at the same step on every rank. `counts`: totals (e.g. unreadable_images), summed over
        the ranks and shown when not zero."""
        means, counts = self.averages(), dict(counts or {})
        if world > 1:  # every rank checks for NaN, so every rank must see the same numbers
            names, count_names = sorted(means), sorted(counts)
            t = torch.tensor([means[n] for n in names] + [float(counts[n]) for n in count_names], device=self.device)
            dist.all_reduce(t)
            means = dict(zip(names, (t[:len(names)] / world).tolist()))
            counts = {n: int(v) for n, v in zip(count_names, t[len(names):].tolist())}
        bad = [k for k, v in means.items() if not math.isfinite(v) and k not in self.measured]
        if bad:
            raise TrainingError(f"the loss {', '.join(bad)} became {means[bad[0]]} by step {step}: training diverged. "
                                "The last good checkpoint is untouched; resume from it with a lower --lr or a larger "
                                "--r1")
        now = time.time()
        img_per_s = max(step - self.last_step, 1) * self.global_batch / max(now - self.last_time, 1e-9)
        record = {"step": step, "kimg": step * self.global_batch / 1000,
                  "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "elapsed": now - self.started, "img_per_s": img_per_s, "sec_per_kimg": 1000 / max(img_per_s, 1e-9),
                  "eta_hours": (self.total_steps - step) * self.global_batch / max(img_per_s, 1e-9) / 3600,
                  **{k: v if math.isfinite(v) else None for k, v in means.items()}, **counts}
        if self.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if rank == 0:
            losses_text = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            mem = f"  mem {record['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in record else ""
            counted = "".join(f"  {k.replace('_', ' ')} {v}" for k, v in counts.items() if v)
            print(f"step {step:>8}  kimg {record['kimg']:9.1f}  {img_per_s:7.1f} img/s  "
                  f"{record['sec_per_kimg']:7.2f} s/kimg  eta {record['eta_hours']:6.2f} h  "
                  f"{losses_text}{mem}{counted}", flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key not in ("step", "time") and value is not None:
                        self.tensorboard.add_scalar(key, value, step)
                self.tensorboard.flush()
        self.sums, self.counts = {}, {}
        self.last_time, self.last_step = now, step

    def warn(self, text, step):
        """A warning about the run (rank 0): one line on the console (stderr) and, with --tensorboard, a text."""
        print(f"warning: {text}", file=sys.stderr, flush=True)
        if self.tensorboard is not None:
            self.tensorboard.add_text("warnings", text, step)
            self.tensorboard.flush()

    def image(self, tag, path, step):
        """A sample grid, as written to `path`, to TensorBoard (rank 0, --tensorboard)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------------------------------
# The loop both stages run, and the command's errors


def train_loop(args, step, total_steps, snapshot_every, progress, streams, one_step, measure, state, write,
               rank, world, device):
    """Run from `step` to `total_steps`; returns the step reached. Each iteration: one_step(step, unlabeled, labeled
    pair, the pairs' identities) -> losses, watched by the watchdog; then, outside its watch, measure(step, snapshot
    due) -> measurements ({} for none), the progress line, and every `snapshot_every` steps, at the end and on a
    signal a checkpoint of state(step), after which write(step, measurements, checkpointed, stopping) writes the
    rest (model.pt, grids), both on rank 0. On a signal every rank stops at the same step with that checkpoint
    written."""
    labeled_stream, unlabeled_stream = streams
    stopper, agree, last_log = StopOnSignal(), Agreement(world, device, 2), time.time()
    try:
        while step < total_steps:
            stopper.step_started()
            unlabeled = next(unlabeled_stream)
            warn_unreadable(unlabeled_stream)
            progress.add(one_step(step, unlabeled, next(labeled_stream), labeled_stream.indices))
            step += 1
            stop, log_due = agree(stopper.step_ended(), time.time() - last_log >= args.log_every)
            if stop:
                stopper.disarm()  # the step ended: what is left is the checkpoint
            checkpoint = step % snapshot_every == 0 or step == total_steps or stop
            measured = measure(step, checkpoint)  # every rank the same numbers
            progress.add(measured, measured=True)
            if checkpoint or measured or log_due:  # raises on a loss that is not finite before anything is written
                progress.report(step, rank, world, {"unreadable_images": len(unlabeled_stream.unreadable)})
                last_log = time.time()
            rngs = gathered_rng_states(world) if checkpoint else None
            if rank == 0 and checkpoint:
                save_checkpoint({**state(step), "step": step, "rng": rngs, "elapsed": progress.elapsed(),
                                 "labeled_stream": labeled_stream.state_dict(),
                                 "unlabeled_stream": unlabeled_stream.state_dict(), "args": dict(vars(args))},
                                checkpoint_path(args.out, step), args.keep)
            if rank == 0 and (checkpoint or measured):
                write(step, measured, checkpoint, stop)  # after the checkpoint: a preempted job has seconds left
            if checkpoint and world > 1:
                dist.barrier()
            if stop:
                raise Stopped(stopper.signum, step, args.out)
    finally:
        stopper.restore()
        progress.close()
    return step


def main(run):
    """run() as a command: a problem the user can fix is one line on stderr and exit status 2; a signal's stop
    says where the checkpoint is and exits with 128 + the signal; a second Ctrl-C exits with 130."""
    try:
        return run()
    except (data.DataError, TrainingError, model.CheckpointError, losses.LPIPSUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume auto", file=sys.stderr)
        sys.exit(130)
