// Reloads the page every data-refresh seconds while it is visible; nothing else runs in the page.
"use strict";
(function () {
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!(seconds >= 5 && seconds <= 3600)) { return; }
  setInterval(function () {
    if (document.visibilityState === "visible") { window.location.reload(); }
  }, seconds * 1000);
}());
