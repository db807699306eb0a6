// A node started by another derpmesh process (`derpmesh cluster`) must not outlive it, however that
// process ends (a clean stop, a crash, kill -9). The parent gives the node an IPC channel and this
// variable; the operating system closes the channel when the parent dies, and the node stops.
export const STOP_WITH_PARENT_ENV = 'DERPMESH_STOP_WITH_PARENT';

/** Calls `onGone` once when the parent that asked for it (see above) is gone. */
export function onParentGone(onGone: () => void): void {
  if (process.env[STOP_WITH_PARENT_ENV] !== '1' || !process.channel) return;
  // The channel must not keep this process alive by itself.
  process.channel.unref();
  process.once('disconnect', onGone);
}
