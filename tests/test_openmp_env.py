"""The OpenMP spin default cellserve's commands set before torch loads (openmp_env.py)."""

import os
import subprocess
import sys

from cellserve.openmp_env import SPIN_COUNT, peer_environ, set_spin_default


def test_the_spin_default_is_set_when_the_user_set_nothing():
    env = {"PATH": "/bin"}
    assert set_spin_default(env)
    assert env["GOMP_SPINCOUNT"] == SPIN_COUNT


def test_the_users_openmp_settings_win():
    for users in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": ""}):
        env = dict(users)
        assert not set_spin_default(env)
        assert env == users


def test_peers_get_the_users_environment_not_cellserves_default():
    ours = {"PATH": "/bin"}
    set_spin_default(ours)
    assert peer_environ(ours) == {"PATH": "/bin"}
    users = {"PATH": "/bin", "GOMP_SPINCOUNT": "5"}
    set_spin_default(users)
    assert peer_environ(users) == users
    # cellserve's marker inherited from a parent, the user's own value set since
    inherited = {**ours, "GOMP_SPINCOUNT": "5"}
    assert peer_environ(inherited) == {"PATH": "/bin", "GOMP_SPINCOUNT": "5"}


def _cli_environment(extra: dict[str, str]) -> str:
    """What `cellserve`'s entry point leaves in its environment, and whether torch was loaded by
    then (libgomp reads GOMP_SPINCOUNT when torch loads it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, sys\nfrom cellserve.cli import main\ntry:\n    main(['bench', 'engine', '--help'])\n"
            "except SystemExit:\n    pass\nprint(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                         check=True).stdout
    return out.strip().splitlines()[-1]


def test_the_command_sets_the_spin_before_torch_is_imported():
    assert _cli_environment({}) == f"{SPIN_COUNT} False"
    assert _cli_environment({"GOMP_SPINCOUNT": "123"}) == "123 False"
