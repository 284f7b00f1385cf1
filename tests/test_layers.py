"""The import graph: no cycles, counting imports inside functions (import-linter checks the layers)."""

from __future__ import annotations

import grimp


def test_no_import_cycle_counting_function_level_imports():
    graph = grimp.build_graph("engine", "tui", include_external_packages=False)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join([importer, *back[1:]]))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
