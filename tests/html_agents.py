"""An agent whose replies are hostile HTML, for the HTML report's escaping tests; it crashes on a gift card."""

from __future__ import annotations

# Each piece would do something if the page rendered it as markup: run a script, fetch an image, run an
# event handler, close the transcript's <details> early, or restyle the page.
HOSTILE_REPLY = ("Sure! <script>document.documentElement.setAttribute('data-pwned', 'script')</script>"
                 "<img src=\"x.png\" onerror=\"document.documentElement.setAttribute('data-pwned', 'img')\">"
                 "</div></section></details><style>body{display:none}</style><b>not bold</b> &amp; done")


def hostile(messages):
    if "gift card" in messages[-1]["content"].lower():
        raise KeyError("<i>gift_card</i>")
    return HOSTILE_REPLY
