"""mmchat in the browser: chat about images with a LLaVA-1.5-style model (Gradio).

    python app.py                                   # the demo model, http://127.0.0.1:7860
    python app.py --model CKPT --load-in 4bit       # an mmchat checkpoint, LLaVA folder or hub id
    MMCHAT_MODEL=llava-hf/llava-1.5-7b-hf python app.py    # the same, as a Space configures it
    python app.py --api-key SECRET                  # the OpenAI routes under /v1 ask for the key

Beside the page, the same server answers OpenAI's `GET /v1/models` and `POST /v1/chat/completions`
(`mmchat.serving.api`) with the same loaded model, unless `--no-api`; see `api_routes`.

This file is the view: it lays out the page and turns clicks into calls on `mmchat.serving.sessions`.
Flags live in `mmchat.serving.config`, model loading in `mmchat.serving.loaded_model`.
"""
from __future__ import annotations

import html
import os
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import gradio as gr
from starlette.routing import BaseRoute, Match, NoMatchFound

from mmchat.engine import Engine
from mmchat.generate import GenerationConfig, decoding_defaults
from mmchat.serving.config import ServeConfig, on_zero_gpu, parse_args
from mmchat.serving.examples import EXAMPLES, example_path
from mmchat.serving.loaded_model import ServedModel, load_served_model
from mmchat.serving.sessions import Busy, Conversation, History, Question, SessionPool, Turn
from mmchat.templates import CHAT, TEMPLATES

INTRO = ("# mmchat\nChat about images with a LLaVA-1.5-style model. Attach an image with the clip, "
         "drop or paste it into the message box; each new image joins the conversation where you send it.")
HELP = ("Each browser tab has its own conversation. Stop keeps what was said; Regenerate answers the last "
        "question again; Undo removes the last question and its answer.")
EMPTY_BOX = {"text": "", "files": []}
UPDATE_SECONDS = 0.05
"""Streamed text goes out at most this often: a fast model's every token would swamp a slow browser."""
CSS = """
.gradio-container { max-width: 1180px !important; margin: auto; }
#status { border-left: 4px solid var(--color-accent); padding: 2px 12px; background: var(--block-background-fill); }
#status.missing { border-left-color: #d9534f; }
#chat img { max-height: 260px; width: auto; }
#stats { color: var(--body-text-color-subdued); font-size: 0.85em; min-height: 1.5em; }
"""


def gpu_wrapper():
    """`spaces.GPU` where the `spaces` package exists (Hugging Face Spaces), else no wrapping.

    Imported before the model loads, as ZeroGPU asks; outside ZeroGPU `spaces.GPU` changes nothing.
    On ZeroGPU each call runs in a forked worker: see `Handlers.stream` for what crosses over.
    """
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU


def to_chatbot(thread: list[Turn]) -> list[dict]:
    """Turns -> Gradio chatbot messages; an image shows where it entered the conversation."""
    return [{"role": t.role, "content": [{"path": f} for f in t.image_files] + [t.text]} for t in thread]


def stats_line(conversation: Conversation) -> str:
    s = conversation.session.last_stats
    if not s.prompt_tokens:
        return ""
    parts = [f"{s.prompt_tokens} prompt tokens ({s.prompt_tokens - s.prefill_tokens} from the cache)",
             f"{s.new_tokens} new", f"{s.time_to_first_token:.2f} s to the first token"]
    if s.decode_tokens_per_second:
        parts.append(f"{s.decode_tokens_per_second:.0f} tokens/s")
    return " · ".join(parts) + "".join(f"  \n⚠️ {n}" for n in conversation.take_notices())


def _error(message: str, title: str) -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)


def _from_browser(request: gr.Request | None) -> bool:
    """The page's own events carry `x-gradio-user: app`; gradio_client and the JS client send "api"."""
    return request is not None and request.headers.get("x-gradio-user") == "app"


@contextmanager
def _errors_for(request: gr.Request | None):
    """API clients get an error's text as it is; the browser's modal renders it as (sanitised)
    HTML, so for the page it is escaped, or a message with `<image>` in it would lose that."""
    try:
        yield
    except gr.Error as e:
        if not _from_browser(request):
            raise
        raise gr.Error(html.escape(e.message), e.duration, e.visible, e.title, e.print_exception) from None


class Handlers:
    """What the page's events call: each works on the caller's conversation (by session hash)."""

    def __init__(self, served: ServedModel, pool: SessionPool | None, gpu):
        self.served, self.pool = served, pool
        self.stream = gpu(self.stream)  # the one function that runs the model

    @contextmanager
    def conversation(self, request: gr.Request | str, generate: bool = False):
        """The caller's conversation, by request or session hash (a hash: the caller formats errors)."""
        key = request if isinstance(request, str) else request.session_hash
        with _errors_for(None if isinstance(request, str) else request):
            if self.pool is None:
                raise _error(self.served.summary, "No model")
            try:
                with self.pool.use(key, generate) as conversation:
                    yield conversation
            except gr.Error:  # a ValueError too, but already worded for the user (generation failed)
                raise
            except (ValueError, Busy) as e:  # ImageError and ContextError are ValueErrors
                raise _error(str(e), "Can't do that") from None

    def stream(self, key: str, history: History, question: Question | None, gen: GenerationConfig):
        """Runs the model: answers `question` (None: the last one again) and yields `Update`s.

        On ZeroGPU (`spaces.GPU`) each call runs in a worker forked for it: its arguments and
        updates are pickled across, and what it changes in memory is lost. So the conversation
        lives in the main process, which hands over its `history`; the worker rebuilds it and,
        with no KV cache surviving between calls, re-prefills the whole conversation each turn.
        Elsewhere this runs in the main process on the conversation itself, reusing its cache.
        """
        yield from self.pool.conversation_for(key, history).generate(question, gen)

    def answer(self, key: str, message: dict | None, gen: GenerationConfig):
        """Ask (`message`) or regenerate (None); yields (chatbot, stats) as the answer grows.

        Runs in the main process: checks the question, then `Conversation.follow` relays what
        `stream` yields and records the turn (question, image, answer) unless `stream` ran here.
        """
        with self.conversation(key, generate=True) as conversation:
            if message is None:
                conversation.check_regenerate()
                question = None
            else:
                files = message.get("files") or []
                question = conversation.question(message.get("text") or "", files[0] if files else None)
            deltas = conversation.follow(question, self.stream(key, conversation.history(), question, gen))
            thread, answer, shown_at = conversation.thread(), "", time.monotonic()
            yield to_chatbot(thread + [Turn("assistant", "")]), ""
            try:
                for delta in deltas:
                    answer += delta
                    if time.monotonic() - shown_at >= UPDATE_SECONDS:
                        shown_at = time.monotonic()
                        yield to_chatbot(thread + [Turn("assistant", answer)]), ""
            except Exception as e:  # the question stays, so the user can retry it
                raise _error(f"generation failed ({type(e).__name__}: {e}); press Regenerate to try again "
                             "or Undo to remove the question", "Generation failed") from None
            finally:
                deltas.close()  # on Stop the session keeps the partial answer
            yield to_chatbot(conversation.thread()), stats_line(conversation)

    @staticmethod
    def settings(temperature: float, top_p: float, max_new_tokens: float) -> GenerationConfig:
        try:
            return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        except ValueError as e:
            raise _error(str(e), "Settings") from None

    def send(self, message: dict, temperature: float, top_p: float, max_new_tokens: float, request: gr.Request):
        with _errors_for(request):
            gen = self.settings(temperature, top_p, max_new_tokens)
            for chat, stats in self.answer(request.session_hash, message or EMPTY_BOX, gen):
                yield chat, EMPTY_BOX, stats

    def regenerate(self, temperature: float, top_p: float, max_new_tokens: float, request: gr.Request):
        with _errors_for(request):
            yield from self.answer(request.session_hash, None, self.settings(temperature, top_p, max_new_tokens))

    def show(self, request: gr.Request):
        """The conversation as it is (after Stop: waits until the answer was closed and kept)."""
        with self.conversation(request) as conversation:
            return to_chatbot(conversation.thread()), stats_line(conversation)

    def undo(self, request: gr.Request):
        with self.conversation(request) as conversation:
            conversation.undo()
            return to_chatbot(conversation.thread()), ""

    def clear(self, request: gr.Request):
        with self.conversation(request) as conversation:
            conversation.clear()
            return [], ""

    def set_template(self, template: str, request: gr.Request):
        with self.conversation(request) as conversation:
            had_messages = bool(conversation.session.messages)
            conversation.restart(template)
        if had_messages:
            gr.Info(f"New conversation with the {template} template: a template applies to a whole conversation.")
        return [], ""

    def transcript(self, request: gr.Request) -> dict:
        """This session's conversation as the model sees it, and the last turn's token counts."""
        with self.conversation(request) as conversation:
            s = conversation.session
            return {"messages": [{"role": m.role, "text": m.text, "images": m.images} for m in s.messages],
                    "template": s.template or s.model.config.template, "cached_tokens": s.cached_tokens,
                    "prompt_tokens": s.last_stats.prompt_tokens, "prefill_tokens": s.last_stats.prefill_tokens,
                    "new_tokens": s.last_stats.new_tokens}

    def forget(self, request: gr.Request):
        """The page was closed: free its conversation."""
        if self.pool is not None and request is not None:
            self.pool.forget(request.session_hash)

    @staticmethod
    def pick_example(event: gr.SelectData):
        files = [f["path"] if isinstance(f, dict) else f for f in event.value.get("files", [])]
        return {"text": event.value.get("text", ""), "files": files}

    @staticmethod
    def attach_photo(photo: str | None, message: dict | None):
        """A webcam photo goes into the message box, like an attached file."""
        if not photo:
            return gr.skip(), gr.skip()
        return {"text": (message or EMPTY_BOX).get("text", ""), "files": [photo]}, None


def layout(served: ServedModel, pool: SessionPool | None) -> SimpleNamespace:
    """The components, in page order (inside an open `gr.Blocks`)."""
    ready, model = pool is not None, pool.model if pool is not None else None
    ui = SimpleNamespace()
    gr.Markdown(INTRO)
    gr.Markdown(served.summary, elem_id="status", elem_classes=[] if ready else ["missing"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ui.chatbot = gr.Chatbot(
                show_label=False, elem_id="chat", height=520, buttons=["copy", "copy_all"], feedback_options=None,
                placeholder="Ask about an image, or pick an example below." if ready else "No model loaded.",
                examples=[{"icon": str(example_path(e)), "display_text": e.question, "text": e.question,
                           "files": [str(example_path(e))]} for e in EXAMPLES] if ready else None,
            )
            ui.box = gr.MultimodalTextbox(
                placeholder="Type a question; attach, drop or paste an image" if ready else "No model loaded",
                file_types=["image"], file_count="single", sources=["upload"], show_label=False, submit_btn=False,
                max_plain_text_length=1_000_000, interactive=ready, autofocus=True, elem_id="message",
            )
            with gr.Row():
                button = {"interactive": ready, "min_width": 80}
                ui.send = gr.Button("Send", variant="primary", scale=2, elem_id="send", **button)
                ui.stop = gr.Button("Stop", variant="stop", elem_id="stop", **button)
                ui.regenerate = gr.Button("Regenerate", elem_id="regenerate", **button)
                ui.undo = gr.Button("Undo", elem_id="undo", **button)
                ui.clear = gr.Button("Clear", elem_id="clear", **button)
            ui.stats = gr.Markdown("", elem_id="stats")
        with gr.Column(scale=1, min_width=240):
            with gr.Accordion("Generation settings", open=True):
                # The model's own decoding defaults (a converted llava-hf folder's generation config), else LLaVA's
                start = decoding_defaults(model.config) if ready else GenerationConfig()
                ui.temperature = gr.Slider(0.0, 1.5, value=start.temperature, step=0.05, label="Temperature",
                                           elem_id="temperature", info="0 always picks the likeliest word")
                ui.top_p = gr.Slider(0.05, 1.0, value=start.top_p, step=0.05, label="Top-p", elem_id="top-p")
                context = model.max_context if ready else 2048
                ui.max_tokens = gr.Slider(1, min(2048, context), value=min(start.max_new_tokens, context // 2), step=1,
                                          label="Max new tokens", elem_id="max-new-tokens")
                # `chat` (the tokenizer's own template) only where the tokenizer has one; the model's is the default
                choices = [*sorted(TEMPLATES), *([CHAT] if ready and model.tokenizer.chat_template else [])]
                ui.template = gr.Dropdown(choices, value=model.config.template if ready else "llava_v1",
                                          label="Conversation template", interactive=ready,
                                          info="Changing it starts a new conversation")
            with gr.Accordion("Webcam", open=False):
                ui.webcam = gr.Image(sources=["webcam"], type="filepath", show_label=False, interactive=ready,
                                     elem_id="webcam")
            gr.Markdown(HELP)
    return ui


def build_app(served: ServedModel, pool: SessionPool | None, concurrency: int = 1, gpu=lambda fn: fn) -> gr.Blocks:
    """The page; `pool` is None when no model is loaded, and the page then says why.

    `concurrency` answers run at once (Gradio's queue orders the rest): the pool's sessions decode
    them together in its engine (with the API's requests when `python app.py` serves both), so it
    is the engine's `max_batch`. `gpu` wraps the function that runs the model (`spaces.GPU` on Spaces).
    """
    h = Handlers(served, pool, gpu)
    with gr.Blocks(title="mmchat", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        ui = layout(served, pool)
        settings = [ui.temperature, ui.top_p, ui.max_tokens]
        shown = [ui.chatbot, ui.stats]
        on_gpu = {"concurrency_id": "gpu", "concurrency_limit": concurrency, "show_progress_on": [ui.chatbot]}
        fast = {"concurrency_limit": None}  # edits need no GPU slot; the session lock orders them
        asked = [ui.send.click(h.send, [ui.box] + settings, [ui.chatbot, ui.box, ui.stats], api_name="send", **on_gpu),
                 ui.box.submit(h.send, [ui.box] + settings, [ui.chatbot, ui.box, ui.stats], api_visibility="private",
                               **on_gpu)]
        asked.append(ui.regenerate.click(h.regenerate, settings, shown, api_name="regenerate", **on_gpu))
        # Stop closes the running generator; `show` waits for the session lock, then shows what was kept.
        ui.stop.click(None, cancels=asked).then(h.show, None, shown, api_visibility="private", **fast)
        ui.undo.click(h.undo, None, shown, api_name="undo", **fast)
        ui.clear.click(h.clear, None, shown, api_name="clear", **fast)
        ui.chatbot.clear(h.clear, None, shown, api_visibility="private", **fast)  # the chatbot's own trash icon
        ui.template.input(h.set_template, [ui.template], shown, api_name="set_template", **fast)
        ui.chatbot.example_select(h.pick_example, None, [ui.box], api_visibility="private", **fast)
        ui.webcam.input(h.attach_photo, [ui.webcam, ui.box], [ui.box, ui.webcam], api_visibility="private", **fast)
        gr.api(h.transcript, api_name="transcript", **fast)
        demo.unload(h.forget)
    return demo


class Under(BaseRoute):
    """Hands every HTTP request whose path is under `prefix` to `app` unchanged (the path included).

    Given to Gradio's FastAPI app as its first route (`launch(app_kwargs={"routes": ...})`), so
    the OpenAI routes are matched before Gradio's own; Gradio's middleware (CORS, compression)
    wraps them too, but not its page or queue.
    """

    def __init__(self, prefix: str, app):
        self.prefix, self.app = prefix.rstrip("/"), app

    def matches(self, scope) -> tuple[Match, dict]:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == self.prefix or path.startswith(self.prefix + "/")):
            return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params):
        raise NoMatchFound(name, path_params)


def api_routes(config: ServeConfig, served: ServedModel, engine: Engine | None) -> list[BaseRoute]:
    """The OpenAI-compatible routes under /v1, served with the page's model (none with `--no-api`).

    With no model loaded every /v1 request gets a 503 in OpenAI's error shape, with the reason the
    page shows. On Spaces the routes come along: set MMCHAT_API_KEY as a Space secret (or
    MMCHAT_API=false), or anyone can use the Space's hardware through them. On ZeroGPU only the
    page's `spaces.GPU` calls get the GPU, so there the API answers 503 "generation failed".
    """
    if not config.api:
        return []
    from mmchat.serve import model_id
    from mmchat.serving.api import create_app
    from mmchat.serving.api_requests import ApiError

    if served.ready:
        api = create_app(served.model, model_id(config.model), api_key=config.api_key,
                         max_sessions=config.max_sessions, engine=engine)
    else:
        async def api(scope, receive, send):
            no_model = ApiError(503, served.summary, None, "model_not_loaded", kind="server_error")
            await no_model.response()(scope, receive, send)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"warning: the OpenAI routes (/v1) serve {config.host} with no --api-key: anyone who can reach "
              "them can use them (set --api-key / MMCHAT_API_KEY, or --no-api)", flush=True)
    return [Under("/v1", api)]


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    gpu = gpu_wrapper()
    served = load_served_model(config)
    print(served.summary, flush=True)
    # One engine decodes the page's and the API's answers together. Not on ZeroGPU: there each
    # answer runs in a worker process of its own, which an engine's thread does not reach.
    engine = Engine(served.model, config.max_batch) if served.ready and not on_zero_gpu(os.environ) else None
    pool = SessionPool(served.model, config.max_sessions, config.max_conversations, engine=engine) if served.ready else None
    demo = build_app(served, pool, config.max_batch, gpu)
    routes = api_routes(config, served, engine)
    if routes:
        print(f"OpenAI-compatible API: http://{config.host}:{config.port}/v1"
              + (" (bearer key required)" if config.api_key else ""), flush=True)
    demo.queue()
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, show_error=False,
                app_kwargs={"routes": routes},
                theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"]),
                css=CSS, max_file_size="50mb", footer_links=["api", "gradio", "settings"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
