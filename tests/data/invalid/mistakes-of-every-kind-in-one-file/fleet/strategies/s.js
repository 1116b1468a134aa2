// A do-nothing strategy for the loader tests.
module.exports = {
  st_init() {},
  st_heartbeat() {},
  st_exit() {},
};
