"""``visorlib serve`` over loopback, driven by the official ``openai`` client.

Two real server processes are started from the CLI entry point (``python -m visorlib.cli serve``)
on free ports, once for the module: ``big`` serves the shipped weights, batches up to 32 sequences
and reads images under a ``--media-root``; ``small`` serves seeded random weights (whose answers
are long: the trained model answers in one or two words), decodes one sequence at a time with a
queue of one and an API key, so queue overflow and cancellation are deterministic. Every answer is
compared with ``model.generate`` on the same request alone in this process (never with a pinned
string: the shipped weights change when they are retrained).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

import visorlib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "visor-synthdoc-tiny"
KEY = "test-key"
TOKENIZER = ROOT / "visorlib" / "zoo" / "weights" / MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``visorlib serve`` process on a free loopback port."""

    def __init__(self, *flags: str, log: Path):
        self.port = _free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "visorlib.cli", "serve", MODEL, "--port", str(self.port),
                                      "--threads", "1", "--log-level", "warning", *flags],
                                     env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    page(3).save(root / "page.png")
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes((root / "page.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def servers(media, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    big = Server("--max-batch", "32", "--media-root", str(media), "--max-image-pixels", "250000",
                 "--max-body-bytes", "4000000", log=logs / "big.log")
    small = Server("--max-batch", "1", "--max-queue", "1", "--api-key", KEY, "--random-weights", "--seed", "0",
                   "--tokenizer", str(TOKENIZER), log=logs / "small.log")
    try:
        big.wait_ready()
        small.wait_ready()
        yield big, small
    finally:
        for server in (big, small):
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(30)


@pytest.fixture(scope="module")
def big(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    model = visorlib.build(MODEL, pretrained=True).eval()
    return model, visorlib.processor_for(model)


@pytest.fixture(scope="module")
def random_reference():
    """The small server's model: the card's architecture, random weights from seed 0."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the untrained-router warning
        model = visorlib.build(MODEL).eval()
    return model, visorlib.processor_for(model, TOKENIZER)


def page(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy()).resize(size, Image.NEAREST)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


QUESTIONS = ["What is the title?", "What color is the box?", "Read the number.", "What shape is shown?"]


def messages(question: str, images: list[str] = ()) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def expected(reference, question: str, images: list[Image.Image] = (), sa_layers=None, max_tokens: int = 16,
             seed: int | None = None, temperature: float = 1.0, ignore_eos: bool = False) -> str:
    """``model.generate`` on this request alone, decoded as the server decodes."""
    model, processor = reference
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    inputs = processor.chat([{"role": "user", "content": content}], images=list(images) or None)
    sampling = {}
    if seed is not None:
        sampling = {"do_sample": True, "temperature": temperature, "generator": torch.Generator().manual_seed(seed)}
    eos = set() if ignore_eos else set(model.cfg.tokens.eos_token_ids)
    out = model.generate(**inputs, max_new_tokens=max_tokens, sa_layers=sa_layers, eos_token_id=list(eos) or [-1],
                         **sampling)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return processor.decode(new)


GRAMMAR = {"1,3": [1, 3], "none": [], "router": "router", "default": None, "1": [1], "1,3,5,6": [1, 3, 5, 6]}


# -- answers ---------------------------------------------------------------------------------------


def test_completion_equals_generate(big, reference):
    image = page(1)
    reply = big.client().chat.completions.create(model=MODEL, messages=messages(QUESTIONS[0], [data_url(image)]),
                                                 max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[0], [image])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_sampling_with_seed_equals_generate(big, reference):
    reply = big.client().chat.completions.create(model=MODEL, messages=messages("Describe."), max_tokens=24,
                                                 temperature=1.5, seed=7)
    assert reply.choices[0].message.content == expected(reference, "Describe.", max_tokens=24, seed=7,
                                                         temperature=1.5)


def test_ignore_eos_runs_to_max_tokens_like_generate(big, reference):
    reply = big.client().chat.completions.create(model=MODEL, messages=messages(QUESTIONS[3]), max_tokens=30,
                                                 temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 30 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[3], max_tokens=30, ignore_eos=True)


def test_stream_concatenates_to_the_completion(big, reference):
    image = page(2)
    chunks = list(big.client().chat.completions.create(
        model=MODEL, messages=messages("Describe.", [data_url(image)]), max_tokens=40, temperature=1.0, seed=3,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(reference, "Describe.", [image], max_tokens=40, seed=3)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_stream_of_many_chunks(small, random_reference):
    image = page(6)
    chunks = list(small.client(KEY).chat.completions.create(
        model=MODEL, messages=messages("Describe.", [data_url(image)]), max_tokens=30, temperature=1.0, seed=5,
        stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5
    assert "".join(pieces) == expected(random_reference, "Describe.", [image], max_tokens=30, seed=5)
    assert chunks[0].choices[0].delta.role == "assistant"


def test_sixteen_concurrent_mixed_configurations(big, reference):
    """Different sa_layers (router included) decoded in one batch: each equals generate alone."""
    specs = list(GRAMMAR)
    jobs = []
    for i in range(16):
        image = page(10 + i, (48 + 8 * (i % 4), 48))
        # Some sampled, some run past end-of-sequence, so rows join and leave the batch at different steps.
        jobs.append((QUESTIONS[i % 4], image, specs[i % len(specs)], 7 + i if i % 3 == 0 else None, i % 2 == 1))
    client = big.client()

    def ask(job):
        question, image, spec, seed, ignore_eos = job
        extra = {"temperature": 1.0, "seed": seed} if seed is not None else {"temperature": 0}
        return client.chat.completions.create(model=MODEL, messages=messages(question, [data_url(image)]),
                                              max_tokens=24, extra_body={"sa_layers": spec, "ignore_eos": ignore_eos},
                                              **extra)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, jobs))
    for (question, image, spec, seed, ignore_eos), reply in zip(jobs, replies, strict=True):
        want = expected(reference, question, [image], GRAMMAR[spec], max_tokens=24, seed=seed, ignore_eos=ignore_eos)
        assert reply.choices[0].message.content == want, (spec, seed, ignore_eos)
        visor = reply.usage.model_extra["visor"]
        if spec not in ("router", "default"):
            assert visor["sa_layers"] == GRAMMAR[spec]
        assert visor["routed"] == (spec == "router")


def test_usage_reports_configuration_and_flops(big, reference):
    model, _ = reference
    image = page(4)
    reply = big.client().chat.completions.create(model=MODEL, messages=messages(QUESTIONS[1], [data_url(image)]),
                                                 max_tokens=8, temperature=0, extra_body={"sa_layers": "1,3"})
    usage = reply.usage
    visor = usage.model_extra["visor"]
    assert visor["sa_layers"] == [1, 3] and visor["configuration"] == "1,3"
    assert visor["visual_tokens"] > 0
    assert usage.prompt_tokens == visor["visual_tokens"] + visor["text_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    from visorlib.eval.runner import sample_cost  # the numbers `visorlib eval` reports

    cost = sample_cost(model.cfg, visor["visual_tokens"], visor["text_tokens"], [1, 3], usage.completion_tokens)
    assert visor["llm_flops"] == cost["flops"] and visor["prefill_llm_flops"] == cost["prefill_flops"]
    fewer = big.client().chat.completions.create(model=MODEL, messages=messages(QUESTIONS[1], [data_url(image)]),
                                                 max_tokens=8, temperature=0, extra_body={"sa_layers": "none"})
    assert fewer.usage.model_extra["visor"]["prefill_llm_flops"] < visor["prefill_llm_flops"]


def test_image_under_media_root_is_read_and_outside_refused(big, reference, media):
    client = big.client()
    reply = client.chat.completions.create(model=MODEL, messages=messages(QUESTIONS[0], [str(media / "page.png")]),
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected(reference, QUESTIONS[0], [Image.open(media / "page.png")],
                                                        max_tokens=8)
    for url in (str(media.parent / "secret.png"), "../secret.png", f"file://{media.parent / 'secret.png'}",
                "http://127.0.0.1:1/x.png"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages("hi", [url]), max_tokens=4)
        assert info.value.response.json()["error"]["param"] == "messages[0].content[0].image_url.url"


# -- bad input ---------------------------------------------------------------------------------------

GOOD = data_url(page(5))
BAD = [  # (body changes, expected param)
    ({"foo": 1}, "foo"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"n": 2}, "n"),
    ({"stop": 3}, "stop"),
    ({"sa_layers": "2,7"}, "sa_layers"),
    ({"sa_layers": [9]}, "sa_layers"),
    ({"sa_layers": "1,3;none"}, "sa_layers"),
    ({"token_reduction": {"method": "nope"}}, "token_reduction"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": messages("<image> two placeholders", [GOOD])}, "messages[0].content[1].text"),
    ({"messages": messages("many", [GOOD] * 9)}, "messages"),
    ({"messages": messages("x", ["data:image/png;base64,bm90IGFuIGltYWdl"])}, "messages[0].content[0].image_url.url"),
    ({"messages": messages("x", ["data:image/png;base64,@@@"])}, "messages[0].content[0].image_url.url"),
    ({"messages": messages("x", [data_url(Image.new("RGB", (800, 800)))])}, "messages[0].content[0].image_url.url"),
    ({"messages": messages("word " * 1100)}, "messages"),
    ({"max_tokens": 1020}, "max_tokens"),
]


def test_bad_inputs_are_400_naming_the_field_while_others_are_served(big, reference):
    client = big.client()
    good = {}

    def serve_good():
        good["text"] = client.chat.completions.create(model=MODEL, messages=messages("Describe."), max_tokens=200,
                                                      temperature=1.0, seed=11,
                                                      extra_body={"ignore_eos": True}).choices[0].message.content

    worker = threading.Thread(target=serve_good)
    worker.start()
    for change, param in BAD:
        body = {"model": MODEL, "messages": messages(QUESTIONS[0]), "max_tokens": 4, **change}
        extra = {k: body.pop(k) for k in list(body) if k not in ("model", "messages")}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=body["model"], messages=body["messages"], extra_body=extra)
        error = info.value.response.json()["error"]
        assert error["param"] == param, (change, error)
        assert error["type"] == "invalid_request_error" and error["message"]
    raw = httpx.post(big.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "body"
    huge = httpx.post(big.url + "/v1/chat/completions", content=b"x" * 4_100_000)
    assert huge.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages("hi"))
    worker.join(120)
    assert good["text"] == expected(reference, "Describe.", max_tokens=200, seed=11, ignore_eos=True)
    assert httpx.get(big.url + "/health").json() == {"status": "ok"}


def test_models_health_metrics(big):
    listed = big.client().models.list().data
    assert [m.id for m in listed] == [MODEL]
    assert listed[0].model_extra["visor"]["router"] is True
    metrics = httpx.get(big.url + "/metrics").text
    for series in ("visorlib_requests_total", "visorlib_queue_depth", "visorlib_batch_size",
                   "visorlib_generation_tokens_per_second", "visorlib_configuration_requests_total"):
        assert f"# TYPE {series} " in metrics
    assert 'visorlib_configuration_requests_total{model="visor-synthdoc-tiny",sa_layers="1,3"}' in metrics


# -- queue, cancellation, authentication, shutdown (the one-sequence server) ---------------------------


def _stream_first_chunk(server: Server, tokens: int):
    """Open a long streaming request and read until its first content arrives; returns the open response."""
    client = httpx.Client(timeout=120)
    body = {"model": MODEL, "messages": messages("Describe."), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    response = client.send(client.build_request("POST", server.url + "/v1/chat/completions", json=body,
                                                headers={"Authorization": f"Bearer {KEY}"}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            break
    return client, response, lines


def test_api_key_required(small):
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=2)
    reply = small.client(KEY).chat.completions.create(model=MODEL, messages=messages("hi"), max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_queue_overflow_is_429_with_retry_after(small):
    client, response, _ = _stream_first_chunk(small, 1000)  # holds the only batch row
    try:
        served = []
        queued = threading.Thread(target=lambda: served.append(small.client(KEY).chat.completions.create(
            model=MODEL, messages=messages("hi"), max_tokens=2)))
        queued.start()  # takes the only queue place
        deadline = time.monotonic() + 30
        while "visorlib_queue_depth{model=\"visor-synthdoc-tiny\"} 1" not in httpx.get(small.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        over = httpx.post(small.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": messages("hi"), "max_tokens": 2})
        assert over.status_code == 429 and over.headers["retry-after"]
        assert over.json()["error"]["type"] == "rate_limit_error"
    finally:
        response.close()  # the client goes away: its row is freed, the queued request runs
        client.close()
    queued.join(60)
    assert served and served[0].choices[0].finish_reason in ("stop", "length")


def test_cancelled_stream_frees_its_slot(small, random_reference):
    client, response, _ = _stream_first_chunk(small, 1000)
    response.close()
    client.close()
    started = time.monotonic()
    reply = small.client(KEY).chat.completions.create(model=MODEL, messages=messages(QUESTIONS[2]), max_tokens=8,
                                                      temperature=0)
    assert reply.choices[0].message.content == expected(random_reference, QUESTIONS[2], max_tokens=8)
    assert time.monotonic() - started < 60
    metrics = httpx.get(small.url + "/metrics").text
    cancelled = [line for line in metrics.splitlines() if 'outcome="cancelled"' in line]
    assert cancelled and float(cancelled[0].split()[-1]) >= 1


def test_sigterm_finishes_the_request_in_flight(small):
    client, response, lines = _stream_first_chunk(small, 200)
    small.proc.send_signal(signal.SIGTERM)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    response.close()
    client.close()
    assert events[-1] == "[DONE]"
    finish = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1]) if c["choices"]]
    assert finish[-1] == "length"
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete: the usual status of a
    # process that was asked to terminate and did so cleanly.
    assert small.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in small.log.read_text()
