"""OpenAI-compatible server: `python scripts/serve.py MODEL --tp 2 --port 8000`
(as `vllm serve MODEL --tensor-parallel-size 2`). With no model it serves the embedded default.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream or not), /tokenize,
/detokenize, /version, /health, /metrics.
"""
import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import model_options
import uvicorn  # no jax here: XLA_FLAGS is set from the arguments first


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="HF model directory or hub id (as --model)")
    model_options.add(p)
    p.add_argument("--served-model-name", help="name clients use (default: the model as given)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=positive, default=1)
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=positive, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=positive, default=1)
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                   help="share of each device's memory for weights and KV cache")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JAXTP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXTP_API_KEY, else none)")
    p.add_argument("--chat-template", help="a Jinja chat template, or a file holding one, in place of the tokenizer's")
    p.add_argument("--max-num-seqs", type=positive, default=256, help="concurrent sequences at most")
    p.add_argument("--max-num-batched-tokens", type=positive, default=8192,
                   help="prompt tokens prefilled per engine step (longer prompts are prefilled in chunks)")
    p.add_argument("--max-model-len", type=positive, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--max-queue", type=positive, default=512, help="requests in flight before answering 503")
    p.add_argument("--decode-chunk", type=positive, default=8, help="tokens per decode dispatch")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="compute a prompt prefix seen before once and share its KV pages (automatic prefix caching)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the prefill and decode programs before /health says ready (greedy and sampled; "
                        "log-probs, min_tokens and penalties compile on first use)")
    p.add_argument("--max-body-bytes", type=positive, default=8 << 20, help="larger request bodies get a 413")
    p.add_argument("--max-prompts-per-request", type=positive, default=256,
                   help="prompts one /v1/completions request may hold")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM / SIGINT waits for requests in flight before closing them")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--disable-access-log", action="store_true", help="no line per HTTP request")
    args = p.parse_args(argv)
    args.model = args.model_path or args.model
    return args


class Server(uvicorn.Server):
    """uvicorn's server, saying when a signal starts the drain, and ending with exit status 0
    after it (uvicorn re-raises the signal at the end, which exits -15)."""

    def __init__(self, config: uvicorn.Config, llm):
        super().__init__(config)
        self.llm = llm

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            print(f"shutting down on {signal.Signals(sig).name}: {self.llm.in_flight} requests in flight, "
                  f"waiting up to {self.config.timeout_graceful_shutdown} s", flush=True)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def bind_check(host: str, port: int) -> None:
    """Fail now, not after the model has loaded, if the address cannot be served."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def chat_template(value: str | None) -> str | None:
    return Path(value).read_text() if value and Path(value).is_file() else value


def warmup_progress(done: int, total: int, what: str) -> None:
    if done == 1 or done == total or done % 4 == 0:
        print(f"compiling {done}/{total}: {what}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.tp * args.dp * args.pp}").strip()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bind_check(args.host, args.port)
    except OSError as e:
        sys.exit(f"error: {e}")
    import jaxtp
    from jaxtp.entrypoints.openai_api import build_app
    from jaxtp.entrypoints.serving import AsyncLLM

    try:
        model = jaxtp.load(args.model, tp=args.tp, dp=args.dp, pp=args.pp,
                           memory_fraction=args.gpu_memory_utilization, enable_prefix_caching=args.enable_prefix_caching,
                           **model_options.load_kwargs(args))
        llm = AsyncLLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       max_queue=args.max_queue, chunk=args.decode_chunk,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       warmup=warmup_progress if args.warmup else None)
        app = build_app(llm, args.served_model_name or args.model, args.api_key, chat_template(args.chat_template),
                        args.max_body_bytes, args.max_prompts_per_request)
    except (ValueError, TypeError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"serving {args.model} on http://{args.host}:{args.port} (tp={model.tp}, dp={model.dp}, pp={model.pp}, "
          f"up to {args.max_num_seqs} sequences of {llm.max_model_len} tokens, KV cache of "
          f"{llm.engine.blocks.capacity * llm.engine.blocks.page_size} tokens per replica)", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.disable_access_log, timeout_graceful_shutdown=args.shutdown_timeout)
    try:
        Server(config, llm).run()
    finally:
        llm.close()
    print("shut down", flush=True)


if __name__ == "__main__":
    main()
