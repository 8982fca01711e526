"""`ditserve` command line: generate / serve / ab / eval-tiny / bench-attention.

User errors (bad arguments, an unusable model folder) print one line on stderr and exit 2,
without a traceback; `generate` checks its output path and request before loading a model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ditserve import __version__
from ditserve.rayserve.flags import add_ray_flags

if TYPE_CHECKING:
    from ditserve.server.settings import ServerSettings


def _bench_attention(args: argparse.Namespace) -> int:
    """Time every backend that can serve a few attention shapes on this device; print a table."""
    import statistics
    import time

    import torch

    from ditserve.attention import Attention, AttentionMetadata, AttentionSelector
    from ditserve.attention.backends import create_backends, describe_call
    from ditserve.attention.backends.reference import dense_attention_math

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [("dense self", [args.seq_len], None), ("dense cross", [args.seq_len], [77]), ("packed ragged", [args.seq_len // 2, args.seq_len // 4, 7, 1], None)]
    print(f"ditserve {__version__} attention on {device} ({args.dtype}), heads {args.heads}, head_dim {args.head_dim}")
    print(f"{'shape':<16}{'backend':<16}{'ms/call':>10}{'max err':>10}")
    for label, q_lens, k_lens in shapes:
        kl = k_lens or q_lens
        packed = label.startswith("packed")

        def rand(n):
            return torch.randn(n, args.heads, args.head_dim, device=device, dtype=dtype, generator=gen)

        if packed:
            q, k, v = rand(sum(q_lens)), rand(sum(kl)), rand(sum(kl))
            md = AttentionMetadata.from_lengths(q_lens, k_lens, device=device)
        else:
            q, k, v = rand(q_lens[0])[None], rand(kl[0])[None], rand(kl[0])[None]
            md = None
        ref_q = q[None, : min(64, q_lens[0])] if packed else q[:, :64]
        ref = dense_attention_math(ref_q.double(), (k[None, : kl[0]] if packed else k).double(), (v[None, : kl[0]] if packed else v).double(), args.head_dim**-0.5)
        call = describe_call(q, k, v, (md or AttentionMetadata.dense_for(q, k)).filled(q, k))
        names = [n for n, b in create_backends().items() if b.why_not(call, device) is None] + ["auto"]
        for name in names:
            layer = Attention(selector=AttentionSelector(name))
            out = layer(q, k, v, md)
            got = out[None, : ref_q.shape[1]] if packed else out[:, :64]
            err = (got.double() - ref).abs().max().item()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                layer(q, k, v, md)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            chosen = f" -> {next(iter(layer.selector.choices.values()))}" if name == "auto" else ""
            print(f"{label:<16}{name + chosen:<16}{statistics.median(times):>10.3f}{err:>10.1e}")
    return 0

class _UsageError(Exception):
    """A CLI-level user error (exit 2, no traceback)."""


def default_model_path() -> str | None:
    """The model used without --model: the embedded tiny Wan model (package data), None if not installed."""
    from ditserve.tiny.embedded import default_model_path as embedded_model_path

    try:
        return str(embedded_model_path())
    except FileNotFoundError:
        return None


def _spec_or_none(model: str | None) -> Any:
    """The request spec of `model` read from its configs; if that fails (the command reports why when
    it runs) or no model is named, the embedded model's; None if neither can be read."""
    from ditserve.pipelines import read_request_spec

    for path in (model, default_model_path()):
        if path is not None:
            try:
                return read_request_spec(path)
            except Exception:
                continue
    return None


def _add_request_flags(parser: argparse.ArgumentParser, spec: Any) -> None:
    """One flag per parameter of the model's spec (prompt aside), with its limits and default in the help."""
    if spec is None:
        return
    for p in spec.params:
        if p.name == "prompt":
            continue
        default = "" if p.default is None else f" (default: {p.default if p.default != '' else repr('')})"
        parser.add_argument(p.cli_flag, dest=p.name, type=p.python_type, default=None,
                            metavar=p.cli_flag.lstrip("-").replace("-", "_").upper(),
                            help=f"{p.help}; {p.accepted()}{default}".replace("%", "%%"))
    if spec.takes_image:
        parser.add_argument("--image", default=None, help="a first frame to animate (PNG, JPEG, WebP, ...)")


def _request_fields(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    """The request parameters given on the command line (left-out ones take the model's defaults)."""
    fields = {"prompt": args.prompt}
    for p in spec.params[1:]:
        value = getattr(args, p.name, None)
        if value is not None:
            fields[p.name] = value
    return fields


def _flag_error(error: Any, spec: Any) -> _UsageError:
    """An `InvalidRequest` re-addressed to the flag the user typed."""
    try:
        flag = spec.param(error.field).cli_flag
    except KeyError:
        flag = "--" + error.field.replace("_", "-")
    return _UsageError(f"argument {flag}: {error}")


def _note_tiny_grammar(model: str | None, prompt: str) -> None:
    """The embedded tiny model knows only its grammar's prompts; any other prompt gets a note on stderr."""
    from pathlib import Path

    embedded = default_model_path()
    if embedded is None or (model is not None and Path(model).resolve() != Path(embedded).resolve()):
        return
    from ditserve.tiny import parse_prompt

    try:
        if prompt.strip():
            parse_prompt(prompt)
    except ValueError as e:
        print(f"ditserve generate: note: the embedded tiny model was trained only on prompts of its grammar: {e}",
              file=sys.stderr)


def _model_path(args: argparse.Namespace) -> str:
    model = args.model or default_model_path()
    if model is None:
        raise _UsageError("--model is required: a diffusers-format pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    return model


def _check_cache_flag(value: str | None) -> None:
    """A bad --cache is a usage error, before anything loads."""
    from ditserve.engine.step_cache import parse_step_cache

    try:
        parse_step_cache(value)
    except ValueError as e:
        raise _UsageError(f"argument --cache: {str(e).removeprefix('cache: ')}") from None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong": reported as one line, exit 2."""
    from ditserve.engine import InvalidRequest
    from ditserve.loading import PipelineFolderError, UnknownModelError, WeightLoadError
    from ditserve.output import OutputFormatError
    from ditserve.pipelines.errors import PipelineConfigError

    return (_UsageError, InvalidRequest, OutputFormatError, PipelineFolderError, UnknownModelError,
            WeightLoadError, PipelineConfigError)


def _silence_loading_bars() -> None:
    """transformers/diffusers draw a bar per component load; the CLI shows only its denoising bar.

    (Process-wide switches: the CLI owns its process, so this is the place to flip them.)
    """
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _run_generate(args: argparse.Namespace) -> str:
    """Validate everything cheap, load, generate with a progress bar, save; return the summary line."""
    import time

    from tqdm import tqdm

    from ditserve.engine import InvalidRequest
    from ditserve.output import check_output_path, output_format
    from ditserve.pipelines import read_request_spec

    output = check_output_path(args.output)
    model = _model_path(args)
    spec = read_request_spec(model)
    if spec.output == "image" and output_format(output) != "png":
        raise _UsageError(f"argument --output: this model makes images; write a .png, got {output.name}")
    try:  # the model's own rules, before anything loads
        request = spec.validate(_request_fields(args, spec), image=getattr(args, "image", None))
    except InvalidRequest as e:
        raise _flag_error(e, spec) from None
    _check_cache_flag(args.cache)

    from ditserve.pipelines import Pipeline
    from ditserve.pipelines.options import resolve_load_options

    from ditserve.distributed import ParallelLayout, build_groups, init_from_environment

    try:
        layout = ParallelLayout(samples=args.cfg_parallel, ulysses=args.ulysses_degree, ring=args.ring_degree)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    rank = 0
    if layout.world > 1:
        device_type = (args.device or ("cuda" if _cuda_available() else "cpu")).split(":")[0]
        try:
            rank, rank_device = init_from_environment(layout, device_type)
        except ValueError as e:
            raise _UsageError(str(e)) from None
        args.device = str(rank_device) if rank_device is not None else args.device
    device, dtype, backend = resolve_load_options(args.device, args.dtype, args.attention_backend)

    _silence_loading_bars()
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, attention_backend=backend, compile=args.compile,
                                    cache=args.cache, vae_dtype=args.vae_dtype, quantize=args.quantize)
    if layout.world > 1:
        sample_group, sequence = build_groups(layout, rank)
        try:
            pipe.parallelize(sample_group=sample_group, sequence=sequence)
        except ValueError as e:
            raise _UsageError(str(e)) from None
    load_s = time.perf_counter() - start
    with tqdm(total=request.num_inference_steps, desc="denoising", unit="step", disable=args.quiet or rank != 0) as bar:

        def progress(step: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(1)

        result = pipe.run(request, callback=progress)
    if rank != 0:  # every rank made the same result; the first writes it
        return ""
    path = result.save(output, fps=request.fps)
    t = result.timings
    frames, height, width = result.frames.shape[:3]
    return (
        f"{frames} frame(s) {width}x{height}, {len(t['per_step_s'])} steps at {t['step_mean_s'] * 1e3:.1f} ms/step; "
        f"total {t['total_s']:.2f} s (text {t['text_encode_s']:.2f} s, denoise {t['denoise_s']:.2f} s, "
        f"decode {t['decode_s']:.2f} s; load {load_s:.2f} s) on {device} {str(dtype).removeprefix('torch.')}, "
        f"seed {result.seed} -> {path}"
    )


def _generate(args: argparse.Namespace) -> int:
    """`ditserve generate`: one prompt to one .mp4 / .gif / .png."""
    from ditserve.client import ClientError

    if not args.url:
        _note_tiny_grammar(args.model, args.prompt)
    try:
        summary = _run_remote_generate(args) if args.url else _run_generate(args)
    except _user_errors() as e:
        print(f"ditserve generate: error: {e}", file=sys.stderr)
        return 2
    except ClientError as e:  # --url: the server refused, failed or could not be reached
        print(f"ditserve generate: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ditserve generate: interrupted", file=sys.stderr)
        return 130
    if summary:
        print(summary)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


QUANTIZE_HELP = ("fp8: the DiT blocks' linear layers in FP8 e4m3 (weights per output row, activations per token); "
                 "GPUs with FP8 tensor cores only (sm89+); trades quality for time (docs/performance.md measures it)")
VAE_DTYPE_HELP = "the VAE's dtype (default: the family's: fp32 for Wan and Cosmos3); bf16 decodes faster at a measured cost"
CACHE_HELP = (
    "step caching, off by default: a threshold such as 0.1 (a request reuses its previous predictions, extrapolated, "
    "while their estimated change stays under it), 'uniform:N' (compute every N-th step) or 'off'; trades quality "
    "for time (docs/performance.md measures it)"
)


def _add_parallel_flags(parser: argparse.ArgumentParser, *, serving: bool) -> None:
    """--num-gpus and the degrees that split it, for generate and serve alike."""
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="ranks to run on (GPUs; with --device cpu, gloo processes), started here (no torchrun "
                             f"needed){'; rank 0 serves HTTP' if serving else ''}; split as --cfg-parallel x "
                             "--ulysses-degree x --ring-degree (default: the ranks CFG parallelism leaves split the "
                             "tokens, by Ulysses when the heads divide by them, else by ring)")
    parser.add_argument("--cfg-parallel", type=int, default=1,
                        help="ranks dividing each step's samples: 2 puts a request's cond and uncond on two GPUs")
    parser.add_argument("--ulysses-degree", type=int, default=1,
                        help="ranks dividing each forward's tokens by an all-to-all over heads (the heads must "
                             "divide by it)")
    parser.add_argument("--ring-degree", type=int, default=1,
                        help="ranks dividing each forward's tokens by passing K/V round them (any head count); "
                             "with --ulysses-degree too, ring between groups of that many Ulysses ranks")


def _add_generate(sub: argparse._SubParsersAction, spec: Any) -> None:
    gen = sub.add_parser("generate", help="generate a video (or image) from a prompt",
                         description="Generate one video from a prompt and write it as .mp4, .gif or .png (first "
                                     "frame). The request flags, their limits and defaults are the model's: "
                                     "`ditserve generate --model PATH --help` lists them for that model.")
    gen.add_argument("--model", help="diffusers-format pipeline folder (model_index.json + components; default: the "
                                     "embedded tiny model, which knows prompts like 'a red circle moving left on a "
                                     "blue background')")
    gen.add_argument("--url", help="send the request to a running `ditserve serve` at this URL instead of loading "
                                   "a model (.mp4: a video job; .png: one image)")
    gen.add_argument("--prompt", required=True)
    _add_request_flags(gen, spec)
    gen.add_argument("--output", default="output.mp4", help="output file: .mp4, .gif or .png (default: output.mp4)")
    gen.add_argument("--attention-backend", default=None,
                     help="attention backend name or 'auto' (default: $DITSERVE_ATTENTION_BACKEND, else auto)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    _add_parallel_flags(gen, serving=False)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the DiT blocks: ~1.3x faster steps on an H100 after a one-off compile (~1 min)")
    gen.add_argument("--cache", default=None, metavar="THRESHOLD", help=CACHE_HELP)
    gen.add_argument("--vae-dtype", default=None, choices=["bf16", "fp32"], help=VAE_DTYPE_HELP)
    gen.add_argument("--quantize", default=None, choices=["fp8"], help=QUANTIZE_HELP)
    gen.set_defaults(func=_generate)


def _run_remote_generate(args: argparse.Namespace) -> str:
    """`generate --url`: the same request to a running server (it validates and fills its model's defaults)."""
    import contextlib
    import time

    from tqdm import tqdm

    from ditserve.client import Client, ClientError, QueueFullError, write_file_atomically
    from ditserve.output import check_output_path, output_format

    if args.model:
        raise _UsageError("give --model (generate here) or --url (ask a server that loaded its model), not both")
    if getattr(args, "image", None) is not None:
        raise _UsageError("argument --image: not supported with --url yet; generate locally with --model")
    output = check_output_path(args.output)
    if output_format(output) not in ("mp4", "png"):
        raise _UsageError(f"argument --output: with --url the server makes .mp4 (a video) or .png (an image), "
                          f"got {output.name}")
    size = None
    if args.width is not None or args.height is not None:
        if args.width is None or args.height is None:
            raise _UsageError("with --url give both --width and --height (or neither, for the server's default)")
        size = f"{args.width}x{args.height}"
    fields = {k: v for k, v in dict(negative_prompt=args.negative_prompt, size=size,
                                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   seed=args.seed).items() if v is not None}
    with Client(args.url, api_key=os.environ.get("DITSERVE_API_KEY")) as client:
        if output_format(output) == "png":
            write_file_atomically(output, client.generate_image(args.prompt, **fields))
            return f"1 image from {args.url} -> {output}"
        while True:
            try:
                job = client.create_video(args.prompt, num_frames=args.num_frames, fps=args.fps, **fields)
                break
            except QueueFullError as e:  # wait our turn, as the server asks
                print(f"ditserve generate: {e.message}", file=sys.stderr)
                time.sleep(e.retry_after)
        try:
            with tqdm(total=job["total_steps"], desc=f"denoising on {args.url}", unit="step",
                      disable=args.quiet) as bar:
                job = client.wait(job["id"], timeout=24 * 3600, on_update=lambda j: bar.update(j["step"] - bar.n))
        except KeyboardInterrupt:  # do not leave the server working for nobody
            with contextlib.suppress(ClientError):
                client.cancel(job["id"])
            raise
        client.download(job["id"], output)
    t = job["timings"]
    return (f"{job['num_frames']} frame(s) {job['size']}, {job['num_inference_steps']} steps at "
            f"{t['step_mean_s'] * 1e3:.1f} ms/step; total {t['job_s']:.2f} s on {args.url} ({job['id']}), "
            f"seed {job['seed']} -> {output}")


def _server_settings(args: argparse.Namespace) -> tuple[str, ServerSettings]:
    """The model folder and the server settings `serve`'s flags give (ValueError / _UsageError if wrong)."""
    from pathlib import Path

    from ditserve.server.auth import ENV_VAR, load_api_keys
    from ditserve.server.settings import ServerSettings

    model = _model_path(args)
    api_keys = load_api_keys(args.api_key or (), args.api_key_file or (), os.environ.get(ENV_VAR))
    settings = ServerSettings(model_name=args.model_name or Path(model).resolve().name,
                              output_dir=args.output_dir, max_queue=args.max_queue, keep_jobs=args.keep_jobs,
                              max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                              max_steps=args.max_steps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                              shutdown_timeout_s=args.shutdown_timeout, api_keys=api_keys,
                              public_url=args.public_url, docs=args.docs, max_body_bytes=args.max_body_bytes,
                              max_upload_bytes=args.max_upload_bytes, request_timeout_s=args.request_timeout,
                              keep_alive_timeout_s=args.keep_alive_timeout)
    return model, settings


def _load_options(args: argparse.Namespace) -> dict[str, object]:
    return {"device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
            "compile": args.compile, "cache": args.cache, "vae_dtype": args.vae_dtype, "quantize": args.quantize}


def ray_app(args: dict[str, str]) -> Any:
    """The Serve application `ditserve serve --ray` deploys, for Ray's own command:
    `serve run ditserve.cli:ray_app cli="--output-dir /shared/out --replicas 2 ..."` (the same flags, parsed
    and checked by this parser; --output-dir is required since nothing removes a folder afterwards)."""
    import shlex
    from pathlib import Path

    from ditserve.pipelines import read_request_spec
    from ditserve.rayserve.application import build_application, start_hub
    from ditserve.rayserve.flags import ray_options
    from ditserve.server.app import served_spec

    if set(args) - {"cli"}:
        raise ValueError(f"ray_app takes one argument, cli=\"<ditserve serve flags>\"; got {sorted(args)}")
    parsed = build_parser(["serve"]).parse_args(["serve", "--ray", *shlex.split(args.get("cli", ""))])
    model, settings = _server_settings(parsed)
    if settings.output_dir is None:
        raise ValueError("serve run needs --output-dir in cli=\"...\" (a folder every node sees)")
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    options = ray_options(parsed, parsed.device, _replica_ranks(parsed))
    _, token = start_hub(settings, options, parsed.log_level)
    return build_application(model, settings, options, served_spec(read_request_spec(model), settings), token,
                             load=_load_options(parsed), warm=not parsed.no_warm_up, log_level=parsed.log_level)


def _replica_ranks(args: argparse.Namespace) -> tuple[int, int, int]:
    """Each replica's (CFG, Ulysses, ring) split of --num-gpus (several GPUs per replica)."""
    layout = _rank_layout(args)
    return layout.samples, layout.ulysses, layout.ring


def _serve_ray(args: argparse.Namespace) -> int:
    """`ditserve serve --ray`: replicas on Ray Serve (`ditserve.rayserve`); Ray is imported only here."""
    from ditserve.rayserve.flags import ray_options
    from ditserve.rayserve.requirement import RayNotInstalled

    try:
        model, settings = _server_settings(args)
        _check_cache_flag(args.cache)
        options = ray_options(args, args.device, _replica_ranks(args))
        from ditserve.rayserve.launch import serve_on_ray
    except (ValueError, _UsageError, RayNotInstalled) as e:
        print(f"ditserve serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return serve_on_ray(model, settings, options, host=args.host, port=args.port, load=_load_options(args),
                            log_level=args.log_level, warm=not args.no_warm_up)
    except (*_user_errors(), ValueError) as e:
        print(f"ditserve serve: error: {e}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    """`ditserve serve`: the HTTP API (see ditserve.server) until SIGTERM / Ctrl-C."""
    from ditserve.server.main import serve

    if args.ray:
        return _serve_ray(args)
    try:
        model, settings = _server_settings(args)
        _check_cache_flag(args.cache)
        from ditserve.distributed import ParallelLayout

        layout = ParallelLayout(samples=args.cfg_parallel, ulysses=args.ulysses_degree, ring=args.ring_degree)
    except (ValueError, _UsageError) as e:
        print(f"ditserve serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return serve(model, settings, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                     attention_backend=args.attention_backend, compile=args.compile, cache=args.cache,
                     vae_dtype=args.vae_dtype, quantize=args.quantize, log_level=args.log_level, warm=not args.no_warm_up, layout=layout)
    except (*_user_errors(), ValueError) as e:
        print(f"ditserve serve: error: {e}", file=sys.stderr)
        return 2


def _add_serve(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-style /v1/videos, /v1/images/generations)",
                         description="Load a model once and serve generation requests over HTTP. SIGTERM or "
                                     "Ctrl-C shuts down cleanly: running and queued jobs are cancelled, no partial "
                                     "files stay.")
    srv.add_argument("--model", help="diffusers-format pipeline folder (model_index.json + components; "
                                     "default: the embedded tiny model)")
    srv.add_argument("--model-name", help="model id in /v1/models and requests (default: the folder's name)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="most jobs accepted and not finished (waiting, in the batch, or being written); more get "
                          "HTTP 429 (default: 64)")
    srv.add_argument("--max-batch-size", type=int, default=None,
                     help="most jobs admitted to the batch at once; 1 runs one job at a time, each to its end "
                          "(default: no limit; steps are bounded by --max-batch-tokens)")
    _add_parallel_flags(srv, serving=True)
    srv.add_argument("--max-steps", type=int, default=None,
                     help="most denoising steps a request may ask for (default: the model's limit, its scheduler's "
                          "training steps, 1000 for Wan)")
    srv.add_argument("--max-frames", type=int, default=None,
                     help="most frames a video request may ask for (default: the model's limit)")
    srv.add_argument("--max-pixels", type=int, default=None,
                     help="most pixels per frame, width x height (default: the model's size limits alone; requests "
                          "over the step budget, --max-batch-tokens, are refused anyway)")
    srv.add_argument("--max-batch-tokens", type=int, default=None,
                     help="most DiT tokens in one batched step, all jobs' samples together; a bigger job runs "
                          "alone (default: from free device memory after loading; 65536 on CPU)")
    srv.add_argument("--output-dir", default=None,
                     help="where finished videos/images and the job database (.ditserve/jobs.sqlite3) are kept, so "
                          "jobs survive a restart (default: a temporary folder removed at exit)")
    srv.add_argument("--keep-jobs", type=int, default=100,
                     help="finished jobs (and files) kept, across restarts; older ones are deleted (default: 100)")
    srv.add_argument("--shutdown-timeout", type=float, default=25.0,
                     help="seconds SIGTERM may take to stop the running jobs, finish responses and write the files of "
                          "jobs done denoising (default: 25, under Kubernetes' 30 s grace period)")
    srv.add_argument("--api-key", action="append", metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health; each key sees only its "
                          "own jobs; repeatable (prefer --api-key-file or $DITSERVE_API_KEYS: arguments show in ps)")
    srv.add_argument("--api-key-file", action="append", metavar="PATH",
                     help="a file of API keys, one per line (# comments allowed); repeatable")
    srv.add_argument("--public-url", default=None,
                     help="the server's address as clients reach it (https://host[:port][/prefix]), for image 'url' "
                          "responses (default: the address the connection came in on; never the Host header)")
    srv.add_argument("--max-body-bytes", type=int, default=1024 * 1024,
                     help="largest JSON request body; more gets 413 before it is read (default: 1 MiB)")
    srv.add_argument("--max-upload-bytes", type=int, default=32 * 1024 * 1024,
                     help="largest multipart/form-data body (with an input_reference image) (default: 32 MiB)")
    srv.add_argument("--request-timeout", type=float, default=30.0,
                     help="seconds a client has to send a whole request (headers and body); slower ones are "
                          "disconnected (default: 30)")
    srv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open (default: 5)")
    srv.add_argument("--docs", action="store_true", help="serve the OpenAPI schema at /openapi.json (default: off)")
    srv.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    srv.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    srv.add_argument("--attention-backend", default=None,
                     help="attention backend name or 'auto' (default: $DITSERVE_ATTENTION_BACKEND, else auto)")
    srv.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks at load")
    srv.add_argument("--cache", default=None, metavar="THRESHOLD", help=CACHE_HELP)
    srv.add_argument("--vae-dtype", default=None, choices=["bf16", "fp32"], help=VAE_DTYPE_HELP)
    srv.add_argument("--quantize", default=None, choices=["fp8"], help=QUANTIZE_HELP)
    srv.add_argument("--no-warm-up", action="store_true",
                     help="report ready right after loading, without the warm-up (each kind of batch at the smallest sizes, "
                          "one step) that pays kernel and --compile compilation and the attention selector's trials "
                          "before the first request")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_ray_flags(srv)
    srv.set_defaults(func=_serve)


def _run_ab(args: argparse.Namespace) -> str:
    """Check flags and configurations, run the A/B, write --json; return the printed report."""
    from pathlib import Path

    from ditserve.ab import check_config, format_report, parse_config, run_ab
    from ditserve.engine import InvalidRequest

    baseline = parse_config(args.baseline, "argument --baseline")
    candidate = parse_config(args.candidate, "argument --candidate")
    defaults = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    for key, value in defaults.items():
        check_config({key: value}, f"argument --{key}")
    if args.runs < 1:
        raise _UsageError(f"argument --runs: must be >= 1, got {args.runs}")
    if args.warmup < 0:
        raise _UsageError(f"argument --warmup: must be >= 0, got {args.warmup}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise _UsageError(f"argument --json: folder {Path(args.json).parent} does not exist")
    model = _model_path(args)
    from ditserve.pipelines import read_request_spec

    spec = read_request_spec(model)
    request = _request_fields(args, spec)
    try:
        spec.validate(request)
        _silence_loading_bars()
        progress = None if args.quiet else (lambda message: print(f"ditserve ab: {message}", file=sys.stderr))
        report = run_ab(model, baseline, candidate, request, runs=args.runs, warmup=args.warmup,
                        defaults=defaults, progress=progress)
    except InvalidRequest as e:
        raise _flag_error(e, spec) from None
    text = format_report(report)
    if args.json is not None:
        text += f"\nwrote {report.write_json(args.json)}"
    return text


def _ab(args: argparse.Namespace) -> int:
    """`ditserve ab`: the same generation under two loading configurations, compared."""
    try:
        text = _run_ab(args)
    except _user_errors() as e:
        print(f"ditserve ab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditserve ab: interrupted", file=sys.stderr)
        return 130
    print(text)
    return 0


def _add_ab(sub: argparse._SubParsersAction, spec: Any) -> None:
    ab = sub.add_parser(
        "ab", help="compare two loading configurations: output identity, step time, memory",
        description="Load the model under a baseline and a candidate configuration, run the same generation "
                    "(same seed) alternately, and report output SHA-256, determinism, differences (max/mean |diff|, "
                    "PSNR) and speed. A configuration is comma-separated key=value: attention_backend=<name|auto>, "
                    "compile=true|false, dtype=bf16|fp16|fp32, device=<torch device>. Both pipelines stay loaded "
                    "(twice the weights' memory).")
    ab.add_argument("--model", help="diffusers-format pipeline folder (model_index.json + components)")
    ab.add_argument("--baseline", required=True, help='e.g. "attention_backend=sdpa" ("" = defaults)')
    ab.add_argument("--candidate", required=True, help='e.g. "attention_backend=auto,compile=true"')
    ab.add_argument("--runs", type=int, default=3, help="timed runs per configuration (default: 3)")
    ab.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first (default: 1)")
    ab.add_argument("--prompt", default="A cat walks on the grass, realistic")
    _add_request_flags(ab, spec)
    ab.add_argument("--device", default=None, help="for configurations that set none (default: cuda if available)")
    ab.add_argument("--dtype", default=None, help="for configurations that set none (default: bf16 on CUDA, fp32 on CPU)")
    ab.add_argument("--json", default=None, help="also write every number to this JSON file")
    ab.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ab.set_defaults(func=_ab)


def _eval_tiny(args: argparse.Namespace) -> int:
    """`ditserve eval-tiny`: prompt adherence of the tiny model, at its guidance and at 1.0."""
    try:
        model = _model_path(args)
        if args.limit is not None and args.limit < 1:
            raise _UsageError(f"argument --limit: must be >= 1, got {args.limit}")
        _check_cache_flag(args.cache)
        from ditserve.tiny.evaluate import eval_tiny

        _silence_loading_bars()
        return eval_tiny(model, prompt_set=args.prompts, limit=args.limit, guidance_scale=args.guidance_scale,
                         steps=args.steps, seed=args.seed, device=args.device, runner=args.runner,
                         min_adherence=args.min_adherence, vae_ceiling=args.vae_ceiling, json_path=args.json,
                         progress=not args.quiet,
                         levers={"cache": args.cache, "quantize": args.quantize, "vae_dtype": args.vae_dtype})
    except _user_errors() as e:
        print(f"ditserve eval-tiny: error: {e}", file=sys.stderr)
        return 2


def _add_eval_tiny(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval-tiny", help="prompt adherence of the embedded tiny model on prompts held out from its training",
        description="Generate one clip per prompt of the tiny model's grammar (by default the prompts held out from "
                    "its training), score each from pixel statistics (object colour, background colour, direction "
                    "of motion) and print the adherence (share of clips right on all three) at the model's guidance "
                    "and at 1.0 (no guidance).")
    ev.add_argument("--model", help="tiny-model pipeline folder (default: the embedded one)")
    ev.add_argument("--prompts", choices=["held-out", "train", "all"], default="held-out",
                    help="which prompts of the grammar (default: held-out, never seen in training)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N prompts of the set")
    ev.add_argument("--guidance-scale", type=float, default=None,
                    help="the guidance compared with 1.0 (default: the tiny model's, 3.0)")
    ev.add_argument("--steps", type=int, default=None, help="denoising steps (default: the tiny model's, 20)")
    ev.add_argument("--cache", default=None, metavar="THRESHOLD", help=CACHE_HELP)
    ev.add_argument("--quantize", default=None, choices=["fp8"], help=QUANTIZE_HELP)
    ev.add_argument("--vae-dtype", default=None, choices=["bf16", "fp32"], help=VAE_DTYPE_HELP)
    ev.add_argument("--seed", type=int, default=0, help="the i-th prompt's clip uses seed + i (default: 0)")
    ev.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ev.add_argument("--runner", choices=["ditserve", "diffusers"], default="ditserve",
                    help="generate with ditserve's pipeline or diffusers' WanPipeline (a reference)")
    ev.add_argument("--min-adherence", type=float, default=None,
                    help="exit 1 when adherence at --guidance-scale is below this share, e.g. 0.9")
    ev.add_argument("--vae-ceiling", action="store_true",
                    help="also score ground-truth clips after a VAE round trip (the most the VAE allows)")
    ev.add_argument("--json", default=None, help="also write every clip's scores to this JSON file")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval_tiny)


def _model_argument(argv: Sequence[str]) -> str | None:
    """The value of --model in `argv`, if any (the request flags depend on the model)."""
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; `generate` and `ab` get the request flags of the model `argv` names (or the embedded one)."""
    parser = argparse.ArgumentParser(prog="ditserve", description="Fast inference and serving for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    needs_spec = any(command in argv for command in ("generate", "ab"))
    spec = _spec_or_none(_model_argument(argv)) if needs_spec else None
    _add_generate(sub, spec)
    _add_serve(sub)
    _add_ab(sub, spec)
    _add_eval_tiny(sub)

    bench = sub.add_parser("bench-attention", help="time the attention backends available on a device")
    bench.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    bench.add_argument("--seq-len", type=int, default=1024)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5)
    bench.set_defaults(func=_bench_attention)
    return parser


def _without_num_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-gpus":
            skip = True
        elif not arg.startswith("--num-gpus="):
            out.append(arg)
    return out


def _transformer_heads(model: str | None) -> int | None:
    """The DiT's attention heads from the folder's transformer/config.json (for the default split), if readable."""
    import json
    from pathlib import Path

    path = model or default_model_path()
    try:
        return int(json.loads((Path(path) / "transformer" / "config.json").read_text())["num_attention_heads"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _default_request_uses_cfg(model: str | None) -> bool:
    """Whether a request with the model's defaults runs classifier-free guidance (for the default split)."""
    from pathlib import Path

    from ditserve.loading import UnknownModelError
    from ditserve.pipelines import read_request_spec

    try:
        return read_request_spec(Path(model or default_model_path())).default_samples == 2
    except (TypeError, OSError, ValueError, UnknownModelError):
        return False


def _rank_layout(args: argparse.Namespace) -> Any:
    """The `ParallelLayout` of `--num-gpus` and its degrees for the model (a ValueError, before any rank
    starts, when they cannot work)."""
    from ditserve.distributed import default_layout

    def given(value: int) -> int | None:
        return value if value != 1 else None

    heads = _transformer_heads(args.model)
    layout = default_layout(args.num_gpus, given(args.cfg_parallel), given(args.ulysses_degree),
                            given(args.ring_degree), heads, cfg=_default_request_uses_cfg(args.model))
    if heads is not None and heads % layout.ulysses:
        raise ValueError(f"the model's {heads} attention heads do not divide by --ulysses-degree "
                         f"{layout.ulysses}: use --ring-degree {layout.ulysses}, or a Ulysses degree dividing "
                         f"{heads}")
    return layout


def _launch_ranks(argv: list[str], args: argparse.Namespace) -> int:
    """`--num-gpus N` > 1 outside torchrun: start the N ranks of this same command and wait for them."""
    from ditserve.distributed import launch

    try:
        layout = _rank_layout(args)
        device_type = (args.device or ("cuda" if _cuda_available() else "cpu")).split(":")[0]
        rest = _without_num_gpus(argv)
        for flag in ("--cfg-parallel", "--ulysses-degree", "--ring-degree"):  # the launcher passes its layout
            while flag in rest:
                i = rest.index(flag)
                del rest[i:i + 2]
        return launch(rest, layout, device_type)
    except ValueError as e:
        print(f"ditserve {args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "num_gpus", 1) > 1 and "WORLD_SIZE" not in os.environ and not getattr(args, "ray", False):
        return _launch_ranks(argv, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
