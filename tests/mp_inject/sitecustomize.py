"""Put on PYTHONPATH by tests/test_multiprocess.py: with QZ_TEST_UNREADABLE_STEP=N, process 1's
restore of step N raises after Orbax's own collectives (damage only that process sees). Inert
otherwise."""
import os

if os.environ.get("QZ_TEST_UNREADABLE_STEP") and os.environ.get("JAX_PROCESS_ID") == "1":
    from qzhou_jax.checkpoint import manager as _manager

    _restore, _step = _manager.RunCheckpoints.restore, int(os.environ["QZ_TEST_UNREADABLE_STEP"])

    def _failing_restore(self, target, step=None):
        out = _restore(self, target, step)  # every process takes part in Orbax's collectives
        if step == _step:
            raise OSError(f"test: step {step} unreadable on this process only")
        return out

    _manager.RunCheckpoints.restore = _failing_restore
