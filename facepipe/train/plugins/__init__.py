"""Trainer plug-ins: what each method adds to the training loop, one file per method.

The trainer (:mod:`facepipe.train.trainer`) names no method. It builds the stage's head and loss,
runs the steps, clips, logs and checkpoints, and at fixed points asks the plug-ins of the stage:

==========================  ==================================================================
file                        method
==========================  ==================================================================
``margin_heads.py``         plain margin heads: the head's per-step schedule, L-Softmax /
                            SphereFace lambda annealing as run state (``anneal_step``)
``arconvl.py``              Li et al. ARConvL: its head, the radii's parameter group with its
                            own rate and clip limit, class-means centres, its loss and scores
``clmle.py``                Huang et al. CLMLE: clusters, cluster mini-batches and refreshes,
                            the cluster loss, DDP's unused classifier, batch statistics
``drw.py``                  deferred re-weighting: the class weights of each epoch
``umm.py``                  Khan et al.: UMM class margins from uncertainty, SUM sample weights
==========================  ==================================================================

:mod:`~facepipe.train.plugins.base` holds the protocol (:class:`~.base.TrainerPlugin`, whose
hooks are all no-ops or defaults) and the narrow view of the run a plug-in gets
(:class:`~.base.PluginContext`: config, device, data, steps per epoch, run folder, the backbone,
a function that embeds the training images, and calls that read the current head, loss, stage,
position and log); :mod:`~facepipe.train.plugins.registry` lists the plug-ins in hook order.

Adding a loss from a paper
--------------------------
1. Config: give the method its switch and settings in :mod:`facepipe.config`, e.g. a loss
   ``type`` in the ``LossConfig`` union (and, when it computes on logits, its module in
   :func:`facepipe.train.stage_loss.build_stage_loss`), a head type, or a stage field.
2. One file here with a :class:`~.base.TrainerPlugin` subclass: a ``name``, ``applies_to(stage)``
   (the stages it shapes) and the one or two hooks the method needs. Most losses need only
   ``step_loss``, which gets the batch after the backbone (:class:`~.base.StepBatch`: feature
   maps, embeddings, labels, dataset indices, the head and the stage loss) and returns the loss
   and each sample's correctness::

       class CenterLoss(TrainerPlugin):
           \"\"\"Wen et al. (ECCV 2016): softmax plus lambda/2 ||f - c_y||^2, the centres being
           the classifier's rows.\"\"\"

           name = "center"

           @classmethod
           def applies_to(cls, stage):
               return stage.loss.type == "center"

           def step_loss(self, batch):
               f = batch.embeddings.float()
               logits = batch.head(f, batch.labels)
               pull = (f - batch.head.weight[batch.labels]).pow(2).sum(1).mean()
               weight = self.ctx.stage().loss.weight
               return {"loss": batch.loss_fn(logits, batch.labels) + weight / 2 * pull,
                       "correct": logits.detach().argmax(1) == batch.labels,
                       "stats": {"center_pull": pull.detach()}}  # logged with every train record

   Other hooks, when the method needs them: ``margin_weight`` (a per-sample share of the head's
   margin), ``on_epoch_start`` / ``on_epoch_end`` (schedules, refreshes; metrics for the epoch
   record), ``sampler`` (its own batches), ``after_step``, ``log_stats``, ``build_head``,
   ``param_groups`` / ``lr_rule`` / ``clip_limit`` (parameters with their own rate), and
   ``state_dict`` / ``load_state_dict`` for state that must survive a resume (saved as top-level
   checkpoint entries, so keep their keys stable once runs exist).
3. Register the class in :data:`facepipe.train.plugins.registry.PLUGINS`.

A plug-in must not draw random numbers where the trainer would not (the dropout and sampler
streams decide whether a resumed run continues bit for bit); draw them in hooks that run the
same way in a straight and a resumed run, as the existing plug-ins do.
"""
