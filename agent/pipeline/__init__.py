"""The glue between the stages: observations -> index / copy decisions / access events -> Event.

Worker threads drain the watcher's queue and hand copy, access (read, delete,
rename) and coverage-gap `Event`s to `emit` (then signer/spool). Every library
call is a collaborator's. The modules follow an observation:

    core           the worker loop and lifecycle; sensitive-root changes -> index
    destination    a file finished at a destination -> exact_hash copy (or move)
    archives         ... an archive holding labelled members -> archive_member
    unmatched        ... nothing by hash -> label_in_content, same_process, probable
    access_events  reads, deletes and renames of labelled files
    reporting      counters, coverage gaps, the record of reported copies
"""

from agent.pipeline.core import Pipeline
from agent.pipeline.reporting import GapReason, PipelineStats

__all__ = ["GapReason", "Pipeline", "PipelineStats"]
