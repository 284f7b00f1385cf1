"""The run store: one directory per run (runs), its events, where its outputs live (lineage), comparing runs
(compare), and plain-text views of runs and events for `tas` and the panel (render). Light."""
