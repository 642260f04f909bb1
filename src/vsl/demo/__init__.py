"""The built-in demo: a procedural dataset in the SCAN layout (:mod:`.data`, ``vsl make-demo-data``)
and ``vsl demo`` (:mod:`.run`), which trains SGR with and without VSL on it and compares them."""
