"""The command palette (Ctrl+P): every action of the app, searchable by name."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

#: (title, help, app action)
ACTIONS = (
    ("Plan builder", "compose a merge plan with a live preview of what each model keeps", "plan"),
    ("Run the plan", "merge the plan built in the plan builder", "run"),
    ("Filter tensors by name", "every tensor of the model with its statistics, filtered as you type", "filter_tensors"),
    ("Cancel the running merge", "stop between tensors; nothing is written", "cancel_merge"),
    ("Tokens added and lost", "the tokens each model added to or lost from the base's vocabulary", "tokens"),
    ("Diagnose the last merge", "retention and cosine of the merged task vector against each source", "diagnose"),
    ("Open a merged folder", "the diagnosis of any folder holding mergekit_config.yml", "open_merged"),
    ("Open a plan file", "a mergekit plan in the plan builder", "open_plan"),
    ("Merge history", "this session's merges beside the base and the fine-tunes: scores, retention, plan diff",
     "history"),
    ("Help", "keys and what each screen shows", "help"),
    ("Quit", "leave mergescope (asks first while a merge runs)", "quit"),
)


class MergescopeCommands(Provider):
    """mergescope's actions for the command palette."""

    async def discover(self) -> Hits:
        for title, help_text, action in ACTIONS:
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in ACTIONS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self.app.run_action, action), help=help_text)
