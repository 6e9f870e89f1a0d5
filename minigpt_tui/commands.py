"""Context-aware command palette: the commands offered depend on the screen it was opened
from (each screen's `palette_commands()`), plus app-wide theme and help commands."""

from __future__ import annotations

from functools import partial
from typing import Callable

from textual.command import DiscoveryHit, Hit, Hits, Provider


class MinigptCommands(Provider):
    def commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        cmds: list[tuple[str, str, Callable[[], object]]] = []
        screen_cmds = getattr(self.screen, "palette_commands", None)
        if callable(screen_cmds):
            cmds.extend(screen_cmds())
        app = self.app
        for name in getattr(app, "theme_names", []):
            if name != app.theme:
                cmds.append((f"theme: {name}", f"Switch to the {name} theme", partial(setattr, app, "theme", name)))
        cmds.append(("help: keys", "Show the keys of this screen (F1)", app.action_help))  # type: ignore[attr-defined]
        return cmds

    async def discover(self) -> Hits:
        for title, help_text, callback in self.commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self.commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
