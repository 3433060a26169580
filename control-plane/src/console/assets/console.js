// The Falaj console's only script: progressive enhancement, every page works without it.
// - times: the reader's local time in each <time>'s title (the page shows UTC);
// - live pages (<main data-refresh="N">): the page's main part fetched again every N
//   seconds while the tab is visible, no field of it has focus and nothing has been typed
//   or chosen in its forms (a refresh would wipe it);
// - copy buttons (<button data-copy="ID">): the text of element ID to the clipboard.
"use strict";
(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d.getTime())) {
        t.title = d.toLocaleString() + " (local time)";
      }
    });
  }

  function copyButtons(root) {
    root.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.hidden = false;
      b.addEventListener("click", function () {
        var source = document.getElementById(b.getAttribute("data-copy"));
        if (source && navigator.clipboard) {
          navigator.clipboard.writeText(source.textContent.trim()).then(function () {
            b.textContent = "Copied";
          });
        }
      });
    });
  }

  function refresh(main, seconds) {
    var edited = false;
    main.addEventListener("input", function () { edited = true; });
    main.addEventListener("change", function () { edited = true; });
    setInterval(function () {
      if (document.hidden || edited || main.contains(document.activeElement) && document.activeElement !== main) {
        return;
      }
      fetch(window.location.href, { credentials: "same-origin", redirect: "error" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (text) {
          var next = new DOMParser().parseFromString(text, "text/html").getElementById("main");
          if (next) {
            main.innerHTML = next.innerHTML;
            localTimes(main);
            copyButtons(main);
          }
        })
        .catch(function () { /* keep the page as it is; the next tick tries again */ });
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    copyButtons(document);
    var main = document.getElementById("main");
    var seconds = main && parseInt(main.getAttribute("data-refresh"), 10);
    if (seconds > 0) {
      refresh(main, seconds);
    }
  });
})();
