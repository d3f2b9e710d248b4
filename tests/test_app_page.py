"""The page as built (no server, no browser): the Run and Render jobs share one queue slot (one job at a time on the
device, the others wait), Cancel is not queued behind the job it stops, the demo clip and the miniature preset are
preselected, the methods are ei2.unet.VARIANTS, and the vocabulary note is ei2.text's warning."""

import os
import threading

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason="the web page needs the app extra (gradio)")

from ei2.app import jobs  # noqa: E402
from ei2.app.page import build, vocabulary_text  # noqa: E402
from ei2.text import load_tokenizer, vocabulary_warning  # noqa: E402
from ei2.unet import VARIANTS  # noqa: E402

MINI = str(jobs.REPO / "weights" / "mini")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return build(tmp_path_factory.mktemp("runs"))


def functions(page) -> dict:
    return {f.name: f for f in (page.fns.values() if isinstance(page.fns, dict) else page.fns)}


def test_one_job_at_a_time_and_cancel_unqueued(page):
    fns = functions(page)
    assert {(fns[n].concurrency_id, fns[n].concurrency_limit, fns[n].queue) for n in ("on_run", "on_render")} == \
        {("device", 1, True)}
    assert fns["on_cancel"].queue is False


def test_presets_and_methods(page):
    values = {b.elem_id: b.value for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert values["clip"]["orig_name"] == jobs.DEMO_CLIP.name and values["model"] == MINI
    assert values["caption"] == "a red circle moving right on a white background"
    assert sorted(jobs.METHODS.values()) == sorted(k for k, v in VARIANTS.items() if v.tuned)
    assert {"ei2", "tav", "ta_ln", "ta_ic"} <= set(jobs.METHODS.values())


def test_vocabulary_note_is_the_warning():
    tok = load_tokenizer(MINI)
    note = vocabulary_text(MINI, "a red star", "a panda star\n\na blue moon")
    assert note == "\n\n".join(f"**{vocabulary_warning(tok, p)}**" for p in ("a panda star", "a blue moon"))
    assert vocabulary_text(MINI, "a red star") == "" and vocabulary_text("/no/such/model", "a panda") == ""


def test_a_second_job_waits_for_the_first():
    worker = jobs.Worker()
    release, order, seen = threading.Event(), [], []

    def first(on_event):
        on_event({"phase": "load"})
        release.wait(30)
        order.append("first")

    def second(on_event):
        order.append("second")
        on_event({"phase": "done", "run_dir": "x"})

    one = worker._stream(first)
    assert next(one) == {"phase": "load"}
    waiting = threading.Thread(target=lambda: seen.extend(worker._stream(second)), daemon=True)
    waiting.start()
    waiting.join(2)
    assert seen == [{"phase": "queued"}] and order == []  # the device is busy: the second job waits
    release.set()
    assert list(one) == [] and order[0] == "first"
    waiting.join(30)
    assert order == ["first", "second"] and seen[1:] == [{"phase": "done", "run_dir": "x"}]
    assert not worker.lock.locked()
