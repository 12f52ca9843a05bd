"""The KVPO method, one module per step of an iteration: exploration by KV routing
(:mod:`.exploration`, :mod:`.rollout`; the SDE baseline, :mod:`.sde`), replay under the
deployment context (:mod:`.replay`), the likelihood (:mod:`.likelihood`), rewards and advantages
(:mod:`.scoring`, :mod:`.advantages`) and the update (:mod:`.update`); :mod:`.iteration` gathers
one iteration's data."""
