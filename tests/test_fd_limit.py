"""The daemon raises its open-file limit to what the operator allows."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from cellos_probed import fd_limit


def run_with_limits(soft: int, hard: int, cells: int) -> dict[str, int | bool]:
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))\n"
        "from cellos_probed import fd_limit\n"
        "limit = fd_limit.raise_to_hard_limit(int(sys.argv[3]))\n"
        "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(json.dumps({'soft': limit.soft, 'now': now, 'needed': limit.needed,\n"
        "                  'enough': limit.enough,\n"
        "                  'keeps_every_cgroup': limit.keeps_every_cgroup}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(soft), str(hard), str(cells)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def test_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    # systemd's default soft limit: 1024, too few for a thousand cells
    got = run_with_limits(min(1024, hard), hard, 1000)
    assert got["now"] == got["soft"] == hard
    assert got["needed"] == fd_limit.descriptors_needed(1000) > 1024
    assert got["enough"] is (hard >= got["needed"])


def test_a_hard_limit_below_the_need_is_reported() -> None:
    got = run_with_limits(256, 512, 1000)
    assert got["now"] == 512
    assert got["enough"] is False
    assert run_with_limits(256, 512, 10)["enough"] is True


def test_kept_descriptors_are_counted_against_the_spare_room() -> None:
    budget = fd_limit.DescriptorBudget(limit=25)
    assert budget.take(10)
    assert budget.take(10)
    assert not budget.take(10)  # 30 > 25: the caller reads without keeping
    assert budget.used == 20
    assert not budget.over()
    budget.limit = 15
    assert budget.over()
    budget.give_back(10)
    assert budget.used == 10
    assert not budget.over()


def test_the_spare_room_is_what_the_soft_limit_leaves_beyond_the_cells_needs() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert fd_limit.spare_descriptors(10) == max(0, soft - fd_limit.descriptors_needed(10))
    assert fd_limit.spare_descriptors(10**9) == 0
    wanted = fd_limit.descriptors_wanted(1000)
    assert wanted == fd_limit.descriptors_needed(1000) + fd_limit.KEPT_PER_CELL * 1000


def test_a_limit_below_what_keeping_wants_is_told_apart_from_one_below_the_need() -> None:
    needed = fd_limit.descriptors_needed(100)
    got = run_with_limits(needed, needed, 100)
    assert got["enough"] is True
    assert got["keeps_every_cgroup"] is False
    wanted = fd_limit.descriptors_wanted(100)
    assert run_with_limits(wanted, wanted, 100)["keeps_every_cgroup"] is True
