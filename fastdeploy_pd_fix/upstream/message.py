"""Titles and commit messages in FastDeploy's PR template (Motivation, Modifications, Usage or Command, Accuracy
Tests, Checklist); their fixed text is in ``templates/*.md``."""

from __future__ import annotations

import re
import textwrap
from string import Template
from typing import Optional

from fastdeploy_pd_fix import __version__
from fastdeploy_pd_fix.analysis import TargetAnalysis
from fastdeploy_pd_fix.policy import release
from fastdeploy_pd_fix.upstream.generate import template
from fastdeploy_pd_fix.upstream.rewrite import REGISTRATION_METHOD
from fastdeploy_pd_fix.upstream.rewrite_engine import MAILBOX_ATTRIBUTE, PUT_METHOD

TITLE = "[BugFix][KVCache] Rank-invariant layer-0 release in CacheMessagerV1"
PORTABLE_TITLE = "[BugFix][KVCache] Add layer0_release: rank-invariant layer-0 release core and its CPU unit tests"
#: Stands for the develop PR number in a cherry-pick title until ``--upstream-pr`` gives it.
UPSTREAM_PR_PLACEHOLDER = "TBD"
#: Width of the commit message's paragraphs.
MESSAGE_WIDTH = 116


def _fill(text: str, **options) -> str:
    return textwrap.fill(text, MESSAGE_WIDTH, break_on_hyphens=False, break_long_words=False, **options)


def _render(name: str, **values) -> str:
    """``templates/<name>`` with its ``${placeholders}`` filled in, without its final newline."""
    return Template(template(name)).substitute(values).rstrip("\n")


def is_release_branch(base: str) -> bool:
    return re.search(r"(^|/)release/", base) is not None


def commit_title(base: str, upstream_pr: Optional[str], portable: bool = False) -> str:
    """The PR title; ``[Cherry-Pick]...(#N)`` on a ``release/*`` base (N from ``--upstream-pr``, else TBD)."""
    title = PORTABLE_TITLE if portable else TITLE
    if portable or not is_release_branch(base):
        return title
    number = str(upstream_pr or UPSTREAM_PR_PLACEHOLDER).lstrip("#")
    return f"[Cherry-Pick]{title} (#{number})"


def _checklist(cherry_pick: bool) -> str:
    tags = "[Cherry-Pick][BugFix][KVCache]" if cherry_pick else "[BugFix][KVCache]"
    return _render("checklist.md", tags=tags, cherry_pick="x" if cherry_pick else " ")


def portable_message() -> str:
    return (
        _render(
            "portable_message.md", title=PORTABLE_TITLE, checklist=_checklist(False), related=_render("related.md")
        )
        + "\n"
    )


def registration_calls(analysis: TargetAnalysis) -> str:
    """The registration thread's engine-facing calls besides get_cache_info and cache_info_barrier."""
    if analysis.reports_finished_add:
        return "put_finished_add_cache_task_req and finish_add_cache_task_barrier (pre-#7724)"
    return "no finish_add_cache_task report or barrier (#7724)"


def _engine_line(engine_unwired: Optional[str]) -> str:
    """What the commit does on the engine side, or why not and what to add by hand."""
    if engine_unwired is None:
        return (
            "- ResourceManagerV1 puts the engine's slot-lifecycle notices into the cache-info mailbox, each before "
            "the method's own body: recycle_abort_task the abort and its fence (engine_notices.abort_batches), "
            "add_request_in_p an orphan notice for each request without disaggregate_info "
            f"(engine_notices.orphan_batch), through one new method, {PUT_METHOD}. SplitwiseConnector.__init__ gives "
            f"the resource manager its engine_worker_queue as {MAILBOX_ATTRIBUTE}. Prefill role only: engine_notices "
            "returns nothing elsewhere, and nothing is put without the mailbox."
        )
    return (
        f"- The engine side is not wired on this branch ({engine_unwired}). To add by hand, as the fastdeploy-pd-fix "
        "plugin does at run time: in ResourceManagerV1.recycle_abort_task, before the slot is freed, put each batch "
        "of `engine_notices.abort_batches(self, request_id, next(engine_notices.FENCE_SERIALS))` with the engine "
        "worker queue's put_cache_info; in ResourceManagerV1.add_request_in_p, put "
        "`engine_notices.orphan_batch(self, requests)` if it is not empty; give the resource manager the "
        "SplitwiseConnector's engine_worker_queue. Until then the messagers read no engine announcement and "
        "release by upstream's rule (release.py, rule 10)."
    )


def _modifications(
    mode: str, analysis: TargetAnalysis, store: str, adds_package: bool, engine_unwired: Optional[str]
) -> str:
    package_line = (
        "- New package fastdeploy/cache_manager/layer0_release/ (standard library and numpy only): the kv-signal "
        "parser, the release policy and the messager's per-signal step, with CPU unit tests in "
        "tests/cache_manager/test_layer0_release.py."
        if adds_package
        else "- fastdeploy/cache_manager/layer0_release/ and its tests are already on this branch (portable commit)."
    )
    lines = [
        package_line,
        f"- CacheMessagerV1.consume_signals reads with the same call as before on this branch "
        f"(`{analysis.op_call('kv_signal_data', analysis.op_function)}`) and hands each buffer to "
        "layer0_release.adapters.messager_step: one numpy parse per signal, prefilled_layer_idx and "
        "prefilled_token_num recorded under engine_cache_task_thread_lock as before, layer-0 tasks to the release; "
        "each queued batch is logged as `layer0_release: queued batch #N [...] seq_hash=H`, malformed signals and "
        "dropped tasks are logged, and no exception ends the thread.",
        "- CacheMessagerV1._add_cache_task_thread: one line added before its loop, which attaches the release to "
        "the messager (idempotent): idx_cache_task_dict becomes "
        "layer0_release.adapters.messager_step.BoundTaskDict, which "
        f"hands every store (the loop's own `{store}`) to the release and shows the send loop, for each slot of "
        "the batch it took, that batch's own task. An aborted request's batch may still be queued when the engine "
        "stores the slot's next request; it is then sent with the aborted request's blocks, and its cleanup leaves "
        "the next request's entry in place. Slot-lifecycle notices (an abort, a request computed without transfer; "
        "layer0_release.policy.notice) are taken out of get_cache_info results and handed to the release before the "
        "loop sees them. Its engine-facing calls stay as they are on this "
        f"branch: get_cache_info, cache_info_barrier, {registration_calls(analysis)}.",
        f"- One small new method, {REGISTRATION_METHOD}. The release state (policy, lock, batch journal) is created "
        "lazily, on first use by either prefill thread (messager_step.step_for uses dict.setdefault, so both threads "
        "get the same one): this leaves __init__ untouched and keeps the diff to the two methods the fix is about.",
        _engine_line(engine_unwired),
    ]
    if analysis.has_pending_buffer:
        lines.append(
            "- pending_layer0_signals and its recovery/cleanup code stay as they are: the new consume_signals never "
            "fills the buffer, so they find nothing. Removing them can be a follow-up; it is left out to keep this "
            "change small and easy to cherry-pick."
        )
    if mode == release.UPSTREAM:
        lines.append(
            "- Mode `upstream`: the policy keeps #8034's behaviour (for A/B comparison only; it is not "
            "rank-invariant)."
        )
    return "\n".join(_fill(line, subsequent_indent="  ") for line in lines)


def full_message(
    title: str,
    base: str,
    mode: str,
    analysis: TargetAnalysis,
    store: str,
    upstream_pr: Optional[str],
    adds_package: bool,
    engine_unwired: Optional[str] = None,
) -> str:
    """The message of the branch-specific commit; ``store`` is the task store statement the hook follows;
    ``engine_unwired``: why the engine side is not wired (None: it is)."""
    cherry_pick = is_release_branch(base)
    if cherry_pick and not upstream_pr:
        origin = (
            f"Cherry-pick of the develop PR (#{UPSTREAM_PR_PLACEHOLDER}: its number was not known when this commit "
            "was generated; amend the title, or regenerate with `make-patch --upstream-pr N`)."
        )
    elif cherry_pick:
        origin = f"Cherry-pick of #{str(upstream_pr).lstrip('#')} to {base}."
    else:
        origin = ""
    generated = _fill(
        f"Generated by fastdeploy-pd-fix {__version__} `make-patch --mode {mode}` from `{base}`, where it found: "
        f"{analysis.features()}."
    )
    return (
        _render(
            "full_message.md",
            title=title,
            origin=_fill(origin) + "\n\n" if origin else "",
            modifications=_modifications(mode, analysis, store, adds_package, engine_unwired),
            generated=generated,
            checklist=_checklist(cherry_pick),
            related=_render("related.md"),
        )
        + "\n"
    )
