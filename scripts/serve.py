"""OpenAI-compatible server: `python scripts/serve.py --model PATH --tp 2 --port 8000`
(as `vllm serve PATH --tensor-parallel-size 2`). With no --model it serves the embedded default.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream or not), /health, /metrics.
"""
import argparse
import os
import sys

import model_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_options.add(p)
    p.add_argument("--served-model-name", help="name clients use (default: --model as given)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=64, help="KV-cache slots (concurrent sequences)")
    p.add_argument("--max-model-len", type=int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--max-queue", type=int, default=512, help="requests in flight before answering 503")
    p.add_argument("--decode-chunk", type=int, default=8, help="tokens per decode dispatch")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(args.tp, 1)}").strip()
    import uvicorn

    import jaxtp
    from jaxtp.entrypoints.openai_api import build_app
    from jaxtp.entrypoints.serving import AsyncLLM

    try:
        model = jaxtp.load(args.model, tp=args.tp, **model_options.load_kwargs(args))
        llm = AsyncLLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       max_queue=args.max_queue, chunk=args.decode_chunk)
    except (ValueError, TypeError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    app = build_app(llm, args.served_model_name or args.model)
    print(f"serving {args.model} on http://{args.host}:{args.port} (tp={model.tp}, "
          f"{args.max_num_seqs} slots x {llm.max_model_len} tokens)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        llm.close()


if __name__ == "__main__":
    main()
