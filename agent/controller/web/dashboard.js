// The edgeops dashboard's script layer: refresh the page in place, confirm destructive buttons.
// Served by the controller (/ui/static/dashboard.js); the pages work without it.
(function () {
  "use strict";
  var editing = false; // the operator is filling in a form: do not replace it under them

  document.addEventListener("input", function () { editing = true; });
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      ev.preventDefault();
    }
  });

  function refresh() {
    if (editing || document.visibilityState !== "visible") { return; }
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (resp) {
        if (resp.redirected && resp.url.indexOf("/login") !== -1) {
          window.location.assign(resp.url); // the session ended
          return null;
        }
        return resp.ok ? resp.text() : null;
      })
      .then(function (text) {
        if (!text || editing) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) { main.replaceWith(fresh); }
      })
      .catch(function () { /* the controller is restarting: try again next time */ });
  }

  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (seconds > 0) { window.setInterval(refresh, seconds * 1000); }
})();
