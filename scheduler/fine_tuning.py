"""The fine-tuning JE: OpenAI's `/v1/fine_tuning/jobs`, LoRA training over the cluster that serves.

One request becomes four jobs, run in order (PAPER.md section 1, request -> jobs -> tasks), the
job moving through OpenAI's statuses:
1. validate (`validating_files`): every line of the training and validation files (scheduler/
   files.py, purpose fine-tune) is a chat example (`api.TrainingExample`; at create, a bad line
   is a 400 that names it), rendered with the base model's chat template and tokenized with its
   loss mask (`Tokenizer.encode_chat_for_training`: the assistant's tokens). Without a
   validation file a tenth of the examples (at least one, given two) is held out to evaluate.
2. train (`queued` until placed, then `running`): one training task (flowserve/train.py), a
   process the base model's cluster places on a host with room and counts there like a TE
   (`Cluster.add_process`: its memory committed, a share of the cores). Its progress lines
   become events and checkpoint rows. A task that dies is started again on the same job
   directory and resumes from its last checkpoint (at most `MAX_RESTARTS` times); so does
   every unfinished job when the main process starts again (`resume`).
3. evaluate: the same task after its last step: the loss on the evaluation examples (an event).
4. deploy: the final checkpoint, a PEFT adapter, is registered as the model
   `ft:BASE:SUFFIX:JOBID` in the adapter registry (scheduler/models.py, as /v1/load_lora_adapter
   does) and warmed into a serving TE's slot by a one-token request before the job says
   `succeeded`, so it is served at once; at every start the succeeded jobs' adapters are
   registered again.

Jobs, events and checkpoints are rows of the state store (scheduler/state.py); a job's files
(spec.json, data.json, checkpoints/) lie under the state dir's `fine_tuning/JOBID/`.
"""
import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path

import orjson

from scaling.hosts import train_bytes
from scheduler.api import (APIError, FineTuningCheckpoint, FineTuningEvent, FineTuningJob, FineTuningRequest,
                           invalid, model_not_found, parse_completion,
                           parse_training_example)
from scheduler.cluster import Cluster, NoRoom
from scheduler.files import Files, jsonl_lines
from scheduler.models import Models, ServedModel
from scheduler.state import FineTuningCheckpointRow, FineTuningEventRow, FineTuningJobRow, Resumable, StateStore

log = logging.getLogger("deepflow.fine_tuning")

BASE_LEARNING_RATE = 2e-4      # times learning_rate_multiplier: a usual LoRA rate
AUTO = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
MAX_RESTARTS = 2
PLACE_RETRY_S = 1.0
ACTIVE = ("validating_files", "queued", "running")


class JobFailed(Exception):
    """A job ends as `failed`: its args are OpenAI's error code and the message."""


def job_object(row: FineTuningJobRow) -> FineTuningJob:
    fields = {k: v for k, v in vars(row).items() if k != "adapter_path"}
    if row.status != "succeeded":  # as OpenAI: null until the job has trained them all
        fields["trained_tokens"] = None
    method = {"type": "supervised", "supervised": {"hyperparameters": row.hyperparameters}}
    return FineTuningJob(**fields, method=method)


class TrainingTask:
    """A job's training process as its host's TE list holds it (`Cluster.add_process`): its
    memory counted there, its threads re-balanced with the TEs'."""

    def __init__(self, job_id: str, cost: int):
        self.id, self.cost = f"train-{job_id}", cost
        self.proc: asyncio.subprocess.Process | None = None
        self.threads = 0

    def set_threads(self, n: int) -> None:
        if self.proc and self.proc.returncode is None and n != self.threads:
            self.threads = n
            self.proc.stdin.write(f"threads {n}\n".encode())

    def fail(self, why: str) -> None:
        log.error("%s: %s", self.id, why)
        if self.proc and self.proc.returncode is None:
            self.proc.kill()


class FineTuning(Resumable[FineTuningJobRow]):
    row_type, missing = FineTuningJobRow, ("fine-tuning job", "fine_tuning_job_id")

    def __init__(self, store: StateStore, files: Files, models: Models):
        super().__init__(store)
        self.files, self.models = files, models

    async def create(self, req: FineTuningRequest) -> FineTuningJobRow:
        """Check the request and its files (404 for a missing file, 400 for a wrong purpose or a
        bad line) and start the job."""
        if req.model not in self.models.bases:
            if req.model in self.models.adapters:
                raise invalid(f"{req.model!r} is a LoRA adapter; fine-tune its base model", "model")
            raise model_not_found(req.model)
        hp = req.params
        if hp.lora_rank > self.models.max_lora_rank:
            raise invalid(f"lora_rank {hp.lora_rank} is above the server's --max-lora-rank "
                          f"{self.models.max_lora_rank}", "hyperparameters.lora_rank")
        examples = await asyncio.to_thread(self.examples, req.training_file, "training_file")
        if req.validation_file:
            await asyncio.to_thread(self.examples, req.validation_file, "validation_file")
        resolved = {k: AUTO[k] if v == "auto" else v for k, v in hp.model_dump().items()}
        resolved["batch_size"] = min(resolved["batch_size"], len(examples))
        row = FineTuningJobRow(f"ftjob-{secrets.token_hex(12)}", req.model, req.training_file, req.validation_file,
                               req.suffix, resolved, req.seed if req.seed is not None else secrets.randbelow(2**31),
                               "validating_files", int(time.time()), metadata=req.metadata)
        self.store.insert(row)
        self.event(row.id, f"Validating training file: {req.training_file}")
        self._start(row.id)
        return row

    def events(self, job_id: str, limit: int, after: str | None) -> tuple[list[FineTuningEvent], bool]:
        """The newest first (OpenAI's order), `limit` of them after the event `after`."""
        self.get(job_id)
        rows, more = self.store.page(FineTuningEventRow, limit, after, "rowid", "job_id = ?", (job_id,))
        return [FineTuningEvent(**{k: v for k, v in vars(r).items() if k != "job_id"}) for r in rows], more

    def checkpoints(self, job_id: str, limit: int, after: str | None) -> tuple[list[FineTuningCheckpoint], bool]:
        self.get(job_id)
        rows, more = self.store.page(FineTuningCheckpointRow, limit, after, "step_number", "job_id = ?", (job_id,))
        return [FineTuningCheckpoint(**{k: v for k, v in vars(r).items() if k != "job_id"}, fine_tuning_job_id=job_id)
                for r in rows], more

    def cancel(self, job_id: str) -> FineTuningJobRow:
        """Stop a job that has not finished: its training task is killed; its checkpoints stay."""
        row = self.get(job_id)
        if row.status not in ACTIVE:
            raise APIError(409, f"cannot cancel a fine-tuning job whose status is {row.status}", "fine_tuning_job_id")
        if run := self.runs.get(job_id):
            run.cancel()
        self.store.update(FineTuningJobRow, job_id, status="cancelled", finished_at=int(time.time()))
        self.event(job_id, "Fine-tuning job cancelled")
        return self.get(job_id)

    def forget(self, model: str) -> None:
        """A deleted fine-tuned model is not served again at the next start (its job stays succeeded)."""
        for row in self.store.select(FineTuningJobRow, "fine_tuned_model = ?", (model,)):
            self.store.update(FineTuningJobRow, row.id, adapter_path=None)

    def resume(self) -> None:
        """At start: serve the succeeded jobs' adapters again; carry on the unfinished jobs."""
        for row in self.store.select(FineTuningJobRow, order="created_at"):
            if row.status == "succeeded" and row.adapter_path:
                try:
                    self.models.load_adapter(row.fine_tuned_model, row.adapter_path, row.model)
                except APIError as e:
                    log.error("%s: cannot serve %s again: %s", row.id, row.fine_tuned_model, e.message)
            elif row.status in ACTIVE:
                log.warning("resuming %s (%s)", row.id, row.status)
                self.event(row.id, "The server restarted: resuming the job from its last checkpoint")
                self._start(row.id)

    def examples(self, file_id: str, param: str) -> list[list[dict]]:
        """The chat examples of an uploaded fine-tune file: 404 if it does not exist, 400 for a
        file of another purpose or a line that is not an example."""
        try:
            row = self.files.get(file_id)
        except APIError as e:  # named as the request names it
            raise APIError(404, e.message, param) from None
        if row.purpose != "fine-tune":
            raise invalid(f"file {file_id} has purpose {row.purpose!r}; fine-tuning takes files uploaded "
                          f"with purpose 'fine-tune'", param)
        out = []
        for number, line in enumerate(jsonl_lines(self.files.path(file_id)), 1):
            try:
                out.append(parse_training_example(orjson.loads(line)).as_dicts())
            except APIError as e:
                raise invalid(f"{param} {file_id}, example {number}: {e.message}", param) from None
        if not out:
            raise invalid(f"{param} {file_id} holds no examples", param)
        return out

    def event(self, job_id: str, message: str, type: str = "message", data: dict | None = None,
              level: str = "info") -> None:
        self.store.insert(FineTuningEventRow(f"ftevent-{secrets.token_hex(12)}", job_id, int(time.time()), level,
                                             message, type, data))

    async def _run(self, job_id: str) -> None:
        row = self.get(job_id)
        base = self.models.bases.get(row.model)
        job_dir = self.store.subdir("fine_tuning") / job_id
        try:
            if base is None:
                raise JobFailed("model_not_found", f"the base model {row.model!r} is not served any more")
            if not (job_dir / "data.json").exists():
                await asyncio.to_thread(self.validate, row, base, job_dir)
            self.store.update(FineTuningJobRow, job_id, status="queued")
            done = await self.train(row, base.cluster, job_dir)
            await self.deploy(row, done["adapter"])
        except (JobFailed, APIError) as e:
            code, message = e.args if isinstance(e, JobFailed) else ("invalid_training_file", e.message)
            log.error("%s failed: %s", job_id, message)
            self.store.update(FineTuningJobRow, job_id, status="failed", finished_at=int(time.time()),
                              error={"code": code, "message": message, "param": None})
            self.event(job_id, f"Fine-tuning job failed: {message}", level="error")

    def validate(self, row: FineTuningJobRow, base: ServedModel, job_dir: Path) -> None:
        """Tokenize the examples (in a thread) into the job's data.json and spec.json."""
        tok, limit = base.je.tok, base.cluster.max_model_len
        hp = row.hyperparameters

        def encode(examples: list[list[dict]], name: str) -> list[tuple[list[int], list[int]]]:
            out = []
            for number, messages in enumerate(examples, 1):
                try:
                    ids, mask = tok.encode_chat_for_training(messages)
                except ValueError as e:  # the chat template refused the conversation
                    raise JobFailed("invalid_training_file", f"{name}, example {number}: {e}") from None
                if len(ids) > limit:
                    raise JobFailed("invalid_training_file", f"{name}, example {number}: {len(ids)} tokens; "
                                    f"the model's context is {limit}")
                out.append((ids, mask))
            return out

        train = encode(self.examples(row.training_file, "training_file"), "training_file")
        if row.validation_file:
            held = encode(self.examples(row.validation_file, "validation_file"), "validation_file")
        else:  # the last tenth, at least one example when there are two
            cut = len(train) - max(len(train) // 10, len(train) > 1)
            train, held = train[:cut], train[cut:]
        job_dir.mkdir(parents=True, exist_ok=True)
        spec = {"model_path": base.path, "n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                "learning_rate": BASE_LEARNING_RATE * hp["learning_rate_multiplier"], "rank": hp["lora_rank"],
                "alpha": hp["lora_alpha"], "checkpoint_steps": hp["checkpoint_steps"], "seed": row.seed}
        (job_dir / "spec.json").write_text(json.dumps(spec))
        tokens_per_step = hp["batch_size"] * max(len(ids) for ids, _ in train)
        tmp = job_dir / "data.json.tmp"  # renamed once whole: its presence says validation is done
        tmp.write_text(json.dumps({"train": train, "eval": held, "tokens_per_step": tokens_per_step}))
        os.replace(tmp, job_dir / "data.json")
        self.store.update(FineTuningJobRow, row.id,
                          trained_tokens=hp["n_epochs"] * sum(len(ids) for ids, _ in train))
        self.event(row.id, f"Files validated: {len(train)} training and {len(held)} evaluation examples")

    async def train(self, row: FineTuningJobRow, cluster: Cluster, job_dir: Path) -> dict:
        """Run the training task (restarted from its last checkpoint if it dies) to its end:
        its final report. The job is `running` from its placement on."""
        tokens = json.loads((job_dir / "data.json").read_text())["tokens_per_step"]
        task = TrainingTask(row.id, train_bytes(tokens))
        host = None
        while host is None:
            try:
                host = cluster.add_process(task)
            except NoRoom as e:
                log.info("%s waits for room: %s", row.id, e)
                await asyncio.sleep(PLACE_RETRY_S)
        self.store.update(FineTuningJobRow, row.id, status="running")
        self.event(row.id, f"Training task placed on host {host.name}")
        try:
            for attempt in range(MAX_RESTARTS + 1):
                task.threads = host.threads_per_te()
                task.proc = await host.node.launch_training(str(job_dir), task.threads)
                done = await self.follow(row, task.proc)
                code = await task.proc.wait()
                if done and code == 0:
                    return done
                self.event(row.id, f"The training task exited with code {code}"
                           + ("; restarting it from its last checkpoint" if attempt < MAX_RESTARTS else ""),
                           level="warn")
            raise JobFailed("training_failed", f"the training task failed {MAX_RESTARTS + 1} times")
        finally:
            if task.proc and task.proc.returncode is None:  # cancelled, or the server stops
                task.proc.kill()
            cluster.remove_process(task, host)

    async def follow(self, row: FineTuningJobRow, proc: asyncio.subprocess.Process) -> dict | None:
        """Record a training task's progress lines (flowserve/train.py) until it exits; its
        final line (`done`), if it got that far."""
        done = None
        async for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("%s: %s", row.id, line.decode(errors="replace").rstrip())
                continue
            if "type" in msg:
                self.event(row.id, msg["message"], msg["type"], msg.get("data"))
            elif "checkpoint" in msg:
                step = msg["checkpoint"]
                self.store.insert(FineTuningCheckpointRow(
                    f"ftckpt-{secrets.token_hex(12)}", row.id, int(time.time()), step,
                    {"step": step, "train_loss": msg["train_loss"]}, f"{model_name(row)}:ckpt-step-{step}"),
                    replace=True)
            elif msg.get("phase") == "evaluate":
                self.event(row.id, "Training done; evaluating")
            elif msg.get("done"):
                done = msg
                if msg["valid_loss"] is not None:
                    self.event(row.id, f"Validation loss={msg['valid_loss']:.3f}", "metrics",
                               {"step": msg["step"], "valid_loss": msg["valid_loss"]})
        return done

    async def deploy(self, row: FineTuningJobRow, adapter: str) -> None:
        """Serve the adapter as the job's model, then say `succeeded`. A one-token request with
        it first puts it in a serving TE's slot (if the base has a TE ready), so the model's first
        client request finds it there (dist_sched prefers that TE) rather than on disk."""
        name = model_name(row)
        try:
            lora = self.models.load_adapter(name, adapter, row.model)
        except APIError as e:
            raise JobFailed("deploy_failed", e.message) from None
        je = lora.base.je
        if lora.base.cluster.ready_tes():
            warm = je.completion_job(parse_completion({"prompt": "Hi", "max_tokens": 1}), lora.wire)
            je.start(warm, [])
            try:
                await je.complete(warm)
            except APIError as e:  # the model is served all the same; its first request reads it from disk
                log.warning("%s: warming %s failed: %s", row.id, name, e.message)
        self.store.update(FineTuningJobRow, row.id, status="succeeded", finished_at=int(time.time()),
                          fine_tuned_model=name, adapter_path=adapter)
        self.event(row.id, f"The job has successfully completed: {name} is served")
        log.warning("%s succeeded: serving %s from %s", row.id, name, adapter)


def model_name(row: FineTuningJobRow) -> str:
    return f"ft:{row.model}:{row.suffix or ''}:{row.id}"
