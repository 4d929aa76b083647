"""Who may use the operator console: the shop's staff, after a login.

A real shop uses its own login (Flask-Login, SSO); this one checks one
password, which is enough to show the two halves: a login page that marks
the session, and the access function the console asks on every request.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from flask_orderhooks import OrderHooks

staff = Blueprint("staff", __name__)


@staff.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    target = request.args.get("next", "/")
    # Only a path of this site: never an open redirect to another host.
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        target = "/"
    failed = False
    if request.method == "POST":
        given = request.form.get("password", "").encode("utf-8")
        expected = current_app.config["SHOP_STAFF_PASSWORD"].encode("utf-8")
        if hmac.compare_digest(given, expected):
            session.clear()
            session["staff"] = True
            return redirect(target)
        failed = True
    return render_template("login.html", failed=failed), 401 if failed else 200


def register_console_access(hooks: OrderHooks) -> None:
    """Let logged-in staff into the console; send anyone else to the login."""

    @hooks.console_access
    def shop_staff() -> bool | ResponseReturnValue:
        if session.get("staff"):
            return True
        return redirect(url_for("staff.login", next=request.full_path))
