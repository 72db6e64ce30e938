"""Engine histories: what a prefill instance computes on its slots, as data, and everything derived from it.

One model of the engine, shared by the explorer (:mod:`fastdeploy_pd_fix.verify`), the stand-in scenarios, the
engine slice's scenarios (played on a release's real engine, which must reproduce them), the stress generator, the
benchmarks and the tests:

* :mod:`.occupancy`: a history is a sequence of occupancies, each one request computed on one slot (first chunk
  offset, chunk ends, whether it registers, its fate, its D-part timing and repeats); the features of a history that
  the two streams cannot decide;
* :mod:`.schedules`: the engine's schedules over a history (which chunks each kv signal carries) and the lockstep
  registration orders it admits;
* :mod:`.streams`: the two rank-invariant streams every messager rank sees, with the ground-truth owner of every
  signal task: the signals of an engine schedule (:func:`~.streams.schedule_signals`), registrations whole
  (:class:`~.streams.Workload`) or as cache-info parts with the engine's notices
  (:class:`~.streams.LifecycleWorkload`);
* :mod:`.scenario`: the same streams in the stand-in's scenario form (signal triples, cache-info reads, owners).
"""
