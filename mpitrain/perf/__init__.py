"""Performance models of the all-reduce algorithms: alpha-beta-gamma formulas, fitting, storage,
prediction, extrapolation to many ranks on many hosts, and their reports and plots.

Above the collectives (it times them and writes the decision table ``auto`` reads,
collectives/tuning.py), below the bench (which measures, then calls this to fit and report):

    formulas.py            ring/tree formulas, log-log tables (pure)
    fit.py                 least squares, knees, native's table; fit(rows, primitives) -> CostModel
    model.py               CostModel: predict, best, JSON; auto_table: best as a decision table
    store.py               save/load (with the decision table), add_table, install on a communicator
    measure.py             ping-pong, exchange, np.add, links per node pair (collective)
    report.py              the fitted model's parameters, predicted vs measured, auto vs the best
    links.py               Link and Params: what the extrapolation runs on; literal links
    sources.py             where those come from: cost model files, the cache, bench JSON, defaults
    extrapolate.py         ring, tree, hier on N ranks = H hosts x L (pure)
    validate.py            the network fitted to bench rows; predicted vs measured
    extrapolate_report.py  the extrapolation's tables, crossovers, validation text, JSON
    plot.py                the plots (matplotlib, imported only when drawing)

``python -m mpitrain.perf FILE...`` writes auto's decision table into cost model files written
before tables existed (store.add_table).
"""
