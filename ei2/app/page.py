"""The web page (Gradio): Tune (a clip, its caption, the key settings, Run with live progress and the results as they
come) and Re-edit (a finished run, a new prompt and guidance: rendered from the stored tuned weights and inverted
latent, on the models the app keeps loaded). All work is ei2.train.run / ei2.edit.edit through `jobs.Worker`; one
job at a time (Gradio's queue, one slot for the device); errors are the CLI's one-line messages."""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
# imported here, once, in the main thread: transformers resolves its names lazily, and two jobs' threads doing that at
# once (the page's vocabulary check and a run loading the text encoder) failed with "cannot import name CLIPTextModel"
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

from ..config import load_config
from ..errors import Ei2Error
from ..text import load_tokenizer, vocabulary_warning
from . import jobs
from .uploads import ACCEPTED, store_upload

DEVICE = dict(concurrency_limit=1, concurrency_id="device")  # one job at a time on the device, the others queued
PRESET_KEYS = ("n_frames", "stride", "size", "steps", "learning_rate", "inference_steps", "guidance", "model")


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    return load_tokenizer(model)


def vocabulary_text(model: str, *texts: str) -> str:
    """The miniature model's vocabulary check of the caption and every prompt (`ei2.text.vocabulary_warning`)."""
    try:
        tokenizer = _tokenizer(str(Path(model).expanduser().resolve()))
    except (Ei2Error, OSError):
        return ""  # no tokenizer (yet): the run itself says what is missing
    lines = [w for text in texts for prompt in jobs.prompt_lines(text) if (w := vocabulary_warning(tokenizer, prompt))]
    return "\n\n".join(f"**{line}**" for line in lines)


def preset_values(preset: str) -> dict:
    cfg = load_config(jobs.PRESETS[preset])
    return {k: getattr(cfg, k) for k in PRESET_KEYS}


def build(runs: str | Path) -> gr.Blocks:
    runs = Path(runs).expanduser().resolve()
    worker = jobs.Worker()
    first = next(iter(jobs.PRESETS))
    start = preset_values(first)
    demo_cfg = load_config(jobs.PRESETS[first])
    with gr.Blocks(title="ei2: video editing", analytics_enabled=False) as page:
        gr.Markdown("## ei2: consistent video editing (EI², NeurIPS 2023)\nTune the model on a clip and its caption, "
                    "then edit it with new prompts. One job runs at a time; others wait in the queue.")
        with gr.Tab("Tune"):
            with gr.Row():
                with gr.Column(scale=1):
                    clip = gr.File(value=str(jobs.DEMO_CLIP), label="clip: mp4, gif or zip of frames (demo selected)",
                                   file_types=list(ACCEPTED), type="filepath", elem_id="clip")
                    preset = gr.Dropdown(list(jobs.PRESETS), value=first, label="preset", elem_id="preset")
                    caption = gr.Textbox(demo_cfg.caption, label="caption of the clip", elem_id="caption")
                    prompts = gr.Textbox("\n".join(demo_cfg.edit_prompts), lines=3, label="edit prompts, one per line",
                                         elem_id="prompts")
                    vocab = gr.Markdown(elem_id="vocab")
                    with gr.Accordion("settings", open=True):
                        with gr.Row():
                            n_frames = gr.Number(start["n_frames"], label="frames", precision=0, minimum=1)
                            stride = gr.Number(start["stride"], label="stride", precision=0, minimum=1)
                            size = gr.Number(start["size"], label="size (multiple of 64)", precision=0, step=64)
                        with gr.Row():
                            steps = gr.Number(start["steps"], label="tuning steps", precision=0, minimum=0,
                                              elem_id="steps")
                            lr = gr.Number(start["learning_rate"], label="learning rate")
                            ddim = gr.Number(start["inference_steps"], label="DDIM steps (inversion, edits)",
                                             precision=0, minimum=1, elem_id="ddim-steps")
                        method = gr.Dropdown(list(jobs.METHODS), value=next(iter(jobs.METHODS)), label="method")
                        with gr.Row():
                            precision = gr.Dropdown(list(jobs.PRECISIONS), value="auto", label="precision")
                            guidance = gr.Number(start["guidance"], label="guidance")
                        with gr.Row():
                            name = gr.Textbox("app-demo", label=f"run name (folder in {runs})", elem_id="run-name")
                            model = gr.Textbox(start["model"], label="model folder", elem_id="model")
                        resume = gr.Checkbox(False, label="resume the interrupted run of this name")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="run")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column(scale=2):
                    status = gr.Textbox(label="progress", lines=6, max_lines=12, interactive=False, elem_id="status")
                    with gr.Row():
                        source = gr.Video(label="source", interactive=False, loop=True, height=260,
                                          elem_id="source-video")
                        edited = gr.Video(label="edit (latest)", interactive=False, loop=True, height=260,
                                          elem_id="edit-video")
                    comparison = gr.Video(label="source | edits", interactive=False, loop=True, height=260,
                                          elem_id="comparison-video")
                    grid = gr.Image(label="frame grid", type="filepath", interactive=False, elem_id="grid")
                    metrics = gr.Textbox(label="exact metrics (miniature world, fraction of frames; docs/mini.md)",
                                         lines=2, interactive=False, elem_id="metrics")
        with gr.Tab("Re-edit"):
            with gr.Row():
                run_list = gr.Dropdown(jobs.finished_runs(runs), label="finished run", scale=4, elem_id="run-list",
                                       allow_custom_value=True)
                refresh = gr.Button("refresh", scale=1)
            re_prompt = gr.Textbox(label="new edit prompt", elem_id="reedit-prompt")
            re_vocab = gr.Markdown(elem_id="reedit-vocab")
            with gr.Row():
                re_guidance = gr.Number(start["guidance"], label="guidance", elem_id="reedit-guidance")
                render = gr.Button("Render", variant="primary", elem_id="render")
            re_status = gr.Textbox(label="progress", lines=2, interactive=False, elem_id="reedit-status")
            re_video = gr.Video(label="new edit", interactive=False, loop=True, height=260, elem_id="reedit-video")
            gallery = gr.Gallery(label="the run's edits", columns=4, elem_id="gallery")

        settings = [clip, preset, caption, prompts, n_frames, stride, size, steps, lr, method, precision, ddim,
                    guidance, name, model]

        def on_upload(path):
            if not path:
                return ""
            try:
                return f"clip ok: {store_upload(path, runs)}"
            except Ei2Error as e:
                return f"error: {e}"

        def on_preset(chosen):
            v = preset_values(chosen)
            return [v["n_frames"], v["stride"], v["size"], v["steps"], v["learning_rate"], v["inference_steps"],
                    v["guidance"], v["model"]]

        def on_run(clip_path, preset_name, cap, lines, nf, st, sz, stp, rate, meth, prec, dd, gd, nm, mdl, res):
            log = jobs.ProgressLog()
            shown: list[str] = []
            try:
                if not clip_path:
                    raise Ei2Error("no clip: upload an mp4, gif or zip of frames (or reload the page for the demo)")
                video = store_upload(clip_path, runs)
                cfg = jobs.to_config(jobs.Settings(
                    video=str(video), caption=cap, edit_prompts=jobs.prompt_lines(lines), n_frames=nf, stride=st,
                    size=sz, steps=stp, learning_rate=rate, method=jobs.METHODS.get(meth, meth), precision=prec,
                    ddim_steps=dd, guidance=gd, name=nm, preset=preset_name, model=mdl), runs)
            except Ei2Error as e:
                yield {status: jobs.error_line(e)}
                return
            yield {status: "starting", edited: None, comparison: None, grid: None, metrics: ""}
            for event in worker.train(cfg, resume=bool(res)):
                update = {status: log.add(event)}
                if event["phase"] == "edit":  # the source clip is written before the first edit
                    shown.append(jobs.metrics_line(event["prompt"], event.get("scores")))
                    update.update({source: str(Path(cfg.output_dir) / "source.mp4"), edited: event["video"],
                                   metrics: "\n".join(shown)})
                if event["phase"] == "done":
                    out = Path(event["run_dir"])
                    update.update({source: str(out / "source.mp4"), comparison: str(out / "comparison.mp4"),
                                   grid: str(out / "comparison.png"),
                                   run_list: gr.update(choices=jobs.finished_runs(runs), value=str(out))})
                yield update

        def on_cancel():
            return worker.cancel()

        def gallery_of(run_dir):
            if not run_dir or not Path(run_dir).is_dir():
                return []
            return [(e["gif"], e["prompt"]) for e in jobs.run_edits(run_dir) if "gif" in e]

        def on_render(run_dir, prompt, gd):
            log = jobs.ProgressLog()
            if not run_dir:
                yield {re_status: "error: pick a finished run (Tune one first, or refresh the list)"}
                return
            for event in worker.edit(run_dir, prompt, gd):
                update = {re_status: log.add(event)}
                if event["phase"] == "edit":
                    update[re_video] = event["video"]
                if event["phase"] in ("edit", "done"):
                    update[gallery] = gallery_of(run_dir)
                yield update

        clip.upload(on_upload, clip, status)
        preset.change(on_preset, preset, [n_frames, stride, size, steps, lr, ddim, guidance, model])
        for box in (caption, prompts, model):
            box.change(lambda m, c, p: vocabulary_text(m, c, p), [model, caption, prompts], vocab)
        def re_vocabulary(run_dir, prompt, tune_model):
            try:  # the run's model; the Tune tab's before a run is picked
                return vocabulary_text(load_config(Path(run_dir) / "config.yaml").model if run_dir else tune_model,
                                       prompt)
            except Ei2Error:
                return ""

        re_prompt.change(re_vocabulary, [run_list, re_prompt, model], re_vocab)
        run.click(on_run, settings + [resume], [status, source, edited, comparison, grid, metrics, run_list],
                  **DEVICE)
        cancel.click(on_cancel, None, status, queue=False)  # not queued behind the job it stops
        refresh.click(lambda: gr.update(choices=jobs.finished_runs(runs)), None, run_list)
        # a choice picked in the browser fires `select` (in a second tab `change` alone did not fire)
        gr.on([run_list.change, run_list.select], gallery_of, run_list, gallery)
        render.click(on_render, [run_list, re_prompt, re_guidance], [re_status, re_video, gallery], **DEVICE)
        page.load(lambda m, c, p: (vocabulary_text(m, c, p), gr.update(choices=jobs.finished_runs(runs))),
                  [model, caption, prompts], [vocab, run_list])
    return page
