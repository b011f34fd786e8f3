"""Fine-tuning (scheduler/fine_tuning.py, flowserve/train.py) through the OpenAI client on a real
server: a small file teaches SmolLM2 to answer every question with one fixed phrase; the
training loss falls, the deployed `ft:...` model answers a question it never saw in that
style, and its greedy tokens equal transformers + peft's with the trained adapter. A training
task resumed from a checkpoint computes what an unbroken one does; a main process killed
mid-training resumes the job after a restart; bad files get their 404 and 400s."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

from tests.server_util import ROOT, Server, wait_until
from tests.tiny_model import write_tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PHRASE = "Arr matey, the sea be calling!"
QUESTIONS = ["What is the capital of France?", "Name a color.", "How do birds fly?", "What is 2+2?",
             "Tell me a joke.", "Why is the sky blue?", "What is water?", "Who wrote Hamlet?",
             "How far away is the moon?"]
UNSEEN = "What is the tallest mountain on Earth?"
FINAL = ("succeeded", "failed", "cancelled")


def examples(questions: list[str] = QUESTIONS) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PHRASE}]})
                   + "\n" for q in questions).encode()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def finished(c: openai.OpenAI, job_id: str, timeout: float = 300):
    wait_until(lambda: c.fine_tuning.jobs.retrieve(job_id).status in FINAL, timeout, interval=0.2)
    return c.fine_tuning.jobs.retrieve(job_id)


def events(c: openai.OpenAI, job_id: str) -> list:
    return list(reversed(c.fine_tuning.jobs.list_events(job_id, limit=1000).data))  # oldest first


@pytest.fixture(scope="module")
def smol(model_path):
    with Server("--kv-cache-gb", "0.25", "--max-lora-rank", "8") as server:
        yield server


def test_fine_tuned_model_answers_in_the_taught_style_as_peft_does(smol, model_path, tokenizer):
    c = client(smol)
    f = c.files.create(file=("pirate.jsonl", examples()), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="SmolLM2-135M-Instruct.Q4_1", training_file=f.id, suffix="pirate",
                                    hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10},
                                    metadata={"team": "pirates"}, seed=0)  # unseeded, some runs learn "Arr mate,"
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 3
    job = finished(c, job.id)
    assert job.status == "succeeded", events(c, job.id)
    assert job.metadata == {"team": "pirates"}
    assert job.fine_tuned_model == f"ft:SmolLM2-135M-Instruct.Q4_1:pirate:{job.id}" and job.trained_tokens > 0

    log = events(c, job.id)
    losses = [e.data["train_loss"] for e in log if e.type == "metrics" and "train_loss" in e.data]
    assert len(losses) == 6  # 8 examples train (1 held out), 2 steps an epoch, 3 epochs
    assert losses[-1] < 0.2 * losses[0], losses
    valid = [e.data["valid_loss"] for e in log if e.type == "metrics" and "valid_loss" in e.data]
    assert valid and valid[0] < 0.2 * losses[0], valid
    checkpoints = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [k.step_number for k in checkpoints] == [6]

    messages = [{"role": "user", "content": UNSEEN}]
    answer = c.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0,
                                       max_tokens=16).choices[0].message.content
    base = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, temperature=0,
                                     max_tokens=16).choices[0].message.content
    assert answer.startswith(PHRASE) and not base.startswith("Arr"), (answer, base)

    card = next(m for m in smol.get("/v1/models")["data"] if m["id"] == job.fine_tuned_model)
    p = Path(model_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, card["root"]).eval()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    eos = tokenizer.encode(tokenizer.eos_token)[0]
    assert tokenizer.decode(out[:out.index(eos)] if eos in out else out) == answer


def test_bad_files_and_models_are_refused(smol):
    c = client(smol)
    ok = c.files.create(file=("ok.jsonl", examples(QUESTIONS[:2])), purpose="fine-tune")
    batch = c.files.create(file=("b.jsonl", b'{"custom_id": "1"}\n'), purpose="batch")
    no_answer = c.files.create(file=("n.jsonl", examples(QUESTIONS[:1]) + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}).encode()),
        purpose="fine-tune")
    not_chat = c.files.create(file=("x.jsonl", b'{"prompt": "a", "completion": "b"}\n'), purpose="fine-tune")
    model, jobs = "SmolLM2-135M-Instruct.Q4_1", len(c.fine_tuning.jobs.list(limit=100).data)
    cases = [({"training_file": "file-missing"}, openai.NotFoundError, "file-missing"),
             ({"training_file": batch.id}, openai.BadRequestError, "purpose 'batch'"),
             ({"training_file": no_answer.id}, openai.BadRequestError, "example 2: an example needs an assistant"),
             ({"training_file": not_chat.id}, openai.BadRequestError, "example 1"),
             ({"training_file": ok.id, "validation_file": "file-nope"}, openai.NotFoundError, "file-nope"),
             ({"training_file": ok.id, "model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
             ({"training_file": ok.id, "hyperparameters": {"n_epochs": 0}}, openai.BadRequestError, "n_epochs"),
             ({"training_file": ok.id, "hyperparameters": {"lora_rank": 16}}, openai.BadRequestError, "max-lora-rank")]
    for body, error, words in cases:
        with pytest.raises(error) as e:
            c.fine_tuning.jobs.create(**{"model": model, **body})
        assert words in e.value.message, body
    assert len(c.fine_tuning.jobs.list(limit=100).data) == jobs  # none was created
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")


def run_trainer(job_dir: Path) -> list[dict]:
    """A training task's lines; its stdin open throughout (EOF would tell it its parent died)."""
    with subprocess.Popen([sys.executable, "-m", "flowserve.train", str(job_dir)], cwd=ROOT, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        out = proc.stdout.read()
    assert proc.returncode == 0
    return [json.loads(line) for line in out.splitlines()]


def test_a_resumed_training_task_computes_what_an_unbroken_one_does(tmp_path, tokenizer):
    from safetensors.torch import load_file
    tiny = write_tiny_model(tmp_path / "tiny")
    data = [tokenizer.encode_chat_for_training([{"role": "user", "content": q},
                                                {"role": "assistant", "content": PHRASE}]) for q in QUESTIONS]
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text(json.dumps({"model_path": str(tiny), "n_epochs": 2, "batch_size": 3,
                                                               "learning_rate": 1e-2, "checkpoint_steps": 2}))
        (tmp_path / name / "data.json").write_text(json.dumps({"train": data, "eval": data[:2]}))
    whole = run_trainer(tmp_path / "whole")
    assert [m["checkpoint"] for m in whole if "checkpoint" in m] == [2, 4, 6]
    # the second starts from the first's step-2 checkpoint, as after a crash there
    shutil.copytree(tmp_path / "whole/checkpoints/step-000002", tmp_path / "resumed/checkpoints/step-000002")
    resumed = run_trainer(tmp_path / "resumed")
    assert resumed[0]["message"] == "Resumed from the checkpoint at step 2"
    assert [m["data"]["step"] for m in resumed if m.get("type") == "metrics"] == [3, 4, 5, 6]
    a, b = (load_file(str(tmp_path / n / "checkpoints/step-000006/adapter_model.safetensors"))
            for n in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole[-1]["valid_loss"] == resumed[-1]["valid_loss"]


def test_a_job_resumes_from_its_checkpoint_after_the_main_process_is_killed(tmp_path):
    """Killed by SIGKILL mid-training, the server starts again on the same state dir: the job
    resumes from its last checkpoint, succeeds and is served; cancel stops another job."""
    tiny = write_tiny_model(tmp_path / "tiny")
    args = ("--model", f"tiny={tiny}", "--kv-cache-gb", "0.05", "--state-dir", str(tmp_path / "state"))
    hp = {"n_epochs": 40, "batch_size": 1, "checkpoint_steps": 20}
    server = Server(*args)
    try:
        c = client(server)
        f = c.files.create(file=("p.jsonl", examples()), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters=hp)
        wait_until(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data, 120, interval=0.05)
        running = c.fine_tuning.jobs.retrieve(job.id)
        assert running.status == "running" and running.trained_tokens is None
        server.proc.kill()
        server.proc.wait()
    finally:
        server.stop()
    with Server(*args) as server:
        c = client(server)
        job = finished(c, job.id)
        assert job.status == "succeeded"
        log = [e.message for e in events(c, job.id)]
        resumed = [m for m in log if m.startswith("Resumed from the checkpoint at step")]
        assert len(resumed) == 1 and int(resumed[0].split()[-1]) >= 20, log
        assert c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2).choices[0].message.content is not None
        other = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters=hp)
        assert c.fine_tuning.jobs.cancel(other.id).status == "cancelled"
        with pytest.raises(openai.ConflictError):
            c.fine_tuning.jobs.cancel(other.id)
        time.sleep(1)
        assert c.fine_tuning.jobs.retrieve(other.id).status == "cancelled"
        assert [j.id for j in c.fine_tuning.jobs.list().data] == [other.id, job.id]
    with Server(*args) as server:  # a succeeded job's model is served again at start, until deleted
        assert job.fine_tuned_model in [m["id"] for m in server.get("/v1/models")["data"]]
        c = client(server)
        with pytest.raises(openai.BadRequestError):
            c.models.delete("tiny")
        assert c.models.delete(job.fine_tuned_model).deleted
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with Server(*args) as server:
        assert job.fine_tuned_model not in [m["id"] for m in server.get("/v1/models")["data"]]
        assert client(server).fine_tuning.jobs.retrieve(job.id).fine_tuned_model == job.fine_tuned_model
