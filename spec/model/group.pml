/*
 * group.pml: a Promela model of p2pfed group formation, butterfly all-reduce and abort
 * (spec/group.md sections 2 to 6; reference state machine p2pfed/group.py).
 *
 * Rules of this file (see spec/model/README.md for the full mapping):
 *
 *  - One Node process per node, N = 3 or 4 nodes. Nodes 0 .. NINIT-1 initiate groups, each at
 *    most TRIES times, so the state space is finite. Every node holds a contribution.
 *  - Each ordered pair of nodes has its own FIFO channel link[from*N+to]: like the TCP
 *    channels of p2pfed, messages between one pair keep their order, messages of
 *    different pairs overtake each other freely (a Shard can beat the GroupStart).
 *  - A node handles one input at a time, atomically: a message, a deadline, the loss of a
 *    peer's channel, a local decision (initiate, withdraw). This is GroupProtocol's
 *    receive / poll / peer_lost / withdraw. Every deadline may expire at any moment
 *    (nondeterministic choice): the model says nothing about clocks, so it covers every
 *    ordering of slow links and early timeouts.
 *  - Up to MAXCRASH nodes crash at any point between two inputs while they are in a group
 *    (INITIATING, PENDING or RUNNING; a crash outside a group is, to the others, an
 *    invitee that never answers, which the nondeterministic deadlines already cover).
 *    Messages already on the way from a crashed node may or may not arrive (its
 *    connection was reset); its peers notice the closed channel at some later point
 *    (peer_lost); messages to it vanish.
 *  - Up to MAXWITHDRAW nodes withdraw their contribution (GroupProtocol.withdraw).
 *  - The maths is abstract. A contribution is a token: node m's contribution is the bit
 *    BIT(m). A (reduced) shard carries the set of contributions summed into it, plus
 *    FOREIGN if a contribution of another group (other masks) was added and DUP if one was
 *    added twice. Member m's masked contribution carries the pair masks +mask(m,j) for
 *    j > m and -mask(m,j) for j < m over the members of its group, so a sum over the
 *    contributor set S has no masks left iff, for every pair of members, both or neither
 *    are in S (check_no_masks). Applying a sum with masks left is the safety violation.
 *
 * Checked (spec/model/check.sh): assertions (no masked sum is ever applied; every member
 * that completes a group applies the same set of contributions; channels never overflow),
 * no invalid end state, and a watchdog asserting that whenever the whole system is stuck,
 * no node is stuck in a phase that waits (INITIATING, PENDING, RUNNING): every wait has a
 * deadline. With -DPROGRESS (one initiator, no faults, deadlines only expire when nothing
 * else can happen) the LTL property "eventually every member completes" is checked too.
 *
 * Deliberate bugs (spec/model/README.md, "Planted bugs"); check.sh -D<name> must fail for
 * the first four:
 *  BUG_APPLY_EARLY        a member applies the sum when it holds k-1 reduced shards;
 *  BUG_REDUCE_EARLY       a member reduces its shard when it holds k-1 shards;
 *  BUG_NO_GROUP_CHECK     Shard/ReducedShard are not checked against the running group id;
 *  BUG_NO_ABORT_ON_LOSS   a RUNNING member ignores the loss of a member's channel and
 *                         has no all-reduce deadline;
 *  BUG_NO_START_TIMEOUT   a PENDING member waits for GroupStart without a deadline (spin
 *                         finds no violation: see the README's findings);
 *  BUG_NO_YIELD           an initiator never yields to a higher priority (liveness only).
 */

#ifndef NINIT
#define NINIT 2         /* nodes 0 .. NINIT-1 initiate */
#endif
#ifndef TRIES
#define TRIES 1         /* groups each initiator may start */
#endif
#ifndef GMIN
#define GMIN 3          /* group_min */
#endif
#ifndef GMAX
#define GMAX 3          /* group_max: an initiator invites GMAX-1 peers */
#endif
#ifndef NPRIO
#define NPRIO 2         /* priorities are drawn from 1 .. NPRIO (ties included) */
#endif
#ifndef MAXCRASH
#define MAXCRASH 1
#endif
#ifndef MAXWITHDRAW
#define MAXWITHDRAW 0
#endif
#ifndef QS
#define QS 4            /* capacity of each pair channel (overflow is an assertion) */
#endif

#ifndef N
#define N 4         /* 3 or 4 nodes */
#endif
#define NG (NINIT * TRIES + 1)      /* group ids 1 .. NINIT*TRIES; 0 = none */
#define EARLY (2 * GMAX)            /* buffered early shards (spec/group.md section 4) */

/* phases (spec/group.md section 2) */
#define IDLE 0
#define READY 1
#define INITIATING 2
#define PENDING 3
#define RUNNING 4
#define DEAD 5

/* contents of a (reduced) shard: contributor bits 0..N-1, plus */
#define CONTRIB (BIT(N) - 1)
#define FOREIGN 16      /* a contribution of another group: its masks never cancel here */
#define DUP 32          /* a contribution added twice: its masks are counted twice */

#define BIT(i) (1 << (i))
#define HAS(set, i) (((set) >> (i)) & 1)
#define POP(x) (HAS(x, 0) + HAS(x, 1) + HAS(x, 2) + HAS(x, 3))
#define RANK(i, set) POP((set) & (BIT(i) - 1))   /* index of node i in the sorted list */
#define PH phase[me]
#define QUIET(n) (phase[n] != INITIATING && phase[n] != PENDING && phase[n] != RUNNING)
#define K POP(members)
#define MYIDX RANK(me, members)
#define CAN_INVITE (POP(CONTRIB & ~BIT(me) & ~lost) >= GMIN - 1)

mtype = { INVITE, ACCEPT, DECLINE, START, ABORT, SHARD, RSHARD };

/* fields: type, group id, a, b.  INVITE a=priority; START a=member set;
   SHARD a=index b=contents; RSHARD a=index b=contents */
chan link[N * N] = [QS] of { mtype, byte, byte, byte };

byte phase[N];
byte gmembers[NG];      /* the member list each group was started with (masks derive from it) */
byte done_gid[N];       /* the group each node completed (0: none) */
byte done_set[N];       /* the contributions it applied */
byte ncompleted;
/* weights (spec/group.md section 1, rule 2): node m starts with weight m + 1; a member
   contributes the weight it holds when its run begins and holds its integer share of the
   group total after applying. Per group: the total contributed, the shares handed out so
   far, and how many members applied. */
byte weight[N];
byte gweight[NG];
byte gshares[NG];
byte napplied[NG];
byte deadset;           /* crashed nodes */
byte crashes;
byte withdrawals;

/* scratch of one atomic step (the current message and loop counters): not part of the
   state, since every step is indivisible and leaves nothing in them that a later step reads */
hidden mtype mt;
hidden byte from, mg, ma, mb;
hidden byte vi, vj, vt, vx, vy, ve;

/* ---- helpers (all used inside a node's atomic steps; `me` is the node) ---- */

inline send(to, typ, g, pa, pb) {
    if
    :: HAS(deadset, to) -> skip        /* the channel is gone: the message is lost */
    :: else ->
        assert(nfull(link[me * N + to]));   /* a full channel would block: enlarge QS */
        link[me * N + to]!typ, g, pa, pb
    fi
}

/* send to every node of `set` except me */
inline send_all(set, typ, g, pa, pb) {
    vi = 0;
    do
    :: vi < N ->
        if
        :: HAS(set, vi) && vi != me -> send(vi, typ, g, pa, pb)
        :: else -> skip
        fi;
        vi++
    :: else -> break
    od
}

/* add shard contents c into acc */
inline combine(acc, c) {
    if
    :: (acc & c & CONTRIB) != 0 -> acc = acc | DUP
    :: else -> skip
    fi;
    acc = acc | c
}

/* safety: a sum over contents c has no masks left (pair masks of the group's members) */
inline check_no_masks(c, set) {
    assert((c & (FOREIGN | DUP)) == 0);
    assert((c & CONTRIB & ~set) == 0);  /* a non-member's masks are over another member list */
    vx = 0;
    do
    :: vx < N ->
        vy = vx + 1;
        do
        :: vy < N ->
            if
            :: HAS(set, vx) && HAS(set, vy) ->
                /* +mask(x,y) from x and -mask(x,y) from y: both or neither */
                assert(HAS(c, vx) == HAS(c, vy))
            :: else -> skip
            fi;
            vy++
        :: else -> break
        od;
        vx++
    :: else -> break
    od
}

/* leave a group: forget everything about it (a new group starts from scratch), which also
   keeps equal states equal */
inline enter(p) {
    PH = p;
    gid = 0;
    prio = 0;
    initiator = 0;
    invited = 0;
    accepted = 0;
    members = 0;
    shfrom = 0;
    shacc = 0;
    rfrom = 0;
    nearly = 0;
    vj = 0;
    do
    :: vj < GMAX -> reduced[vj] = 0; vj++
    :: else -> break
    od;
    vj = 0;
    do
    :: vj < EARLY -> early_r[vj] = 0; early_f[vj] = 0; early_a[vj] = 0; early_b[vj] = 0; vj++
    :: else -> break
    od
}

/* ---- formation (spec/group.md section 3) ---- */

inline cancel_formation() {
    /* only to those whose acceptance arrived; a later one is answered in on_reply */
    send_all(accepted, ABORT, gid, 0, 0);
    invited = 0;
    accepted = 0;
    enter(READY)
}

inline abort_run() {
    /* spec/group.md section 6: tell every other member, keep the own model, back to READY */
    send_all(members, ABORT, gid, 0, 0);
    enter(READY)
}

inline make_progress() {
    /* reduce my shard once I hold it from every member */
    if
    :: !HAS(rfrom, MYIDX) && shfrom == members ->
        reduced[MYIDX] = shacc;
        rfrom = rfrom | BIT(MYIDX);
        shfrom = 0;
        shacc = 0;
        send_all(members, RSHARD, gid, MYIDX, reduced[MYIDX])
#ifdef BUG_REDUCE_EARLY
    :: !HAS(rfrom, MYIDX) && POP(shfrom) == K - 1 ->
        reduced[MYIDX] = shacc;
        rfrom = rfrom | BIT(MYIDX);
        shfrom = 0;
        shacc = 0;
        send_all(members, RSHARD, gid, MYIDX, reduced[MYIDX])
#endif
    :: else -> skip
    fi;
    /* apply only with all k reduced shards: their concatenation is the group sum */
    if
    :: rfrom == BIT(K) - 1 -> apply()
#ifdef BUG_APPLY_EARLY
    :: POP(rfrom) == K - 1 ->
        /* the missing reduced shard is filled with my own (masked) shard */
        vj = 0;
        do
        :: vj < K && HAS(rfrom, vj) -> vj++
        :: vj < K && !HAS(rfrom, vj) -> reduced[vj] = BIT(me); rfrom = rfrom | BIT(vj); break
        :: else -> break
        od;
        apply()
#endif
    :: else -> skip
    fi
}

inline apply() {
    vj = 0;
    vt = 0;
    do
    :: vj < K ->
        check_no_masks(reduced[vj], gmembers[gid]);
        vt = vt | (reduced[vj] & CONTRIB);
        vj++
    :: else -> break
    od;
#ifdef CANARY_COMPLETION
    assert(false);      /* sanity run: spin must show that a group can complete */
#endif
    done_gid[me] = gid;
    done_set[me] = vt;
    /* the weight share: floor(W / k), plus one for the first W mod k members by node id */
#ifdef BUG_SHARE_ROUNDING
    weight[me] = gweight[gid] / K;
#else
    weight[me] = gweight[gid] / K + (MYIDX < gweight[gid] % K -> 1 : 0);
#endif
    gshares[gid] = gshares[gid] + weight[me];
    napplied[gid]++;
    /* conservation: once every member applied, the shares add up to the group's total */
    assert(napplied[gid] < K || gshares[gid] == gweight[gid]);
    /* agreement: every member of this group that completed applied the same sum */
    vj = 0;
    do
    :: vj < N ->
        assert(vj == me || done_gid[vj] != gid || done_set[vj] == vt);
        vj++
    :: else -> break
    od;
    ncompleted++;
    enter(IDLE)
}

inline begin_run() {
    gweight[gid] = gweight[gid] + weight[me];   /* complete before any member applies */
    shfrom = BIT(me);
    shacc = BIT(me);
    rfrom = 0;
    vj = 0;
    do
    :: vj < GMAX -> reduced[vj] = 0; vj++
    :: else -> break
    od;
    PH = RUNNING;
    /* shard j of my contribution goes to member j */
    vi = 0;
    do
    :: vi < N ->
        if
        :: HAS(members, vi) && vi != me -> send(vi, SHARD, gid, RANK(vi, members), BIT(me))
        :: else -> skip
        fi;
        vi++
    :: else -> break
    od;
    make_progress()
}

inline finish_formation() {
    if
    :: POP(accepted) + 1 < GMIN -> cancel_formation()
    :: else ->
        members = accepted | BIT(me);
        gmembers[gid] = members;
        invited = 0;
        send_all(accepted, START, gid, members, 0);
        accepted = 0;
        begin_run()
    fi
}

inline initiate() {
    /* invite GMAX-1 of the peers whose channel is open, chosen nondeterministically */
    invited = CONTRIB & ~BIT(me) & ~lost;
    do
    :: POP(invited) > GMAX - 1 ->
        if
        :: HAS(invited, 0) -> invited = invited & ~BIT(0)
        :: HAS(invited, 1) -> invited = invited & ~BIT(1)
        :: HAS(invited, 2) -> invited = invited & ~BIT(2)
        :: HAS(invited, 3) -> invited = invited & ~BIT(3)
        fi
    :: else -> break
    od;
    gid = me * TRIES + tries + 1;
    tries++;
#if defined(PROGRESS) || defined(FIXED_PRIO)
    prio = gid;         /* distinct priorities, the later initiator's is higher */
#else
    select(prio : 1 .. NPRIO);
#endif
    accepted = 0;
    PH = INITIATING;
    send_all(invited, INVITE, gid, prio, 0)
}

inline on_invite() {
    vt = 0;  /* 1: decline */
    if
    :: PH == INITIATING ->
        if
#ifdef BUG_NO_YIELD
        :: true -> vt = 1
#else
        :: ma <= prio -> vt = 1
        :: else -> cancel_formation()     /* preempted by a higher priority */
#endif
        fi
    :: PH == PENDING -> vt = 1           /* never withdraws from an accepted group (rule 3) */
    :: else -> skip
    fi;
    if
    :: vt == 0 && PH == READY ->
        gid = mg;
        prio = ma;
        initiator = from;
        nearly = 0;
        PH = PENDING;
        send(from, ACCEPT, mg, 0, 0)
    :: else -> send(from, DECLINE, mg, 0, 0)
    fi
}

inline on_reply() {
    if
    :: PH == INITIATING && mg == gid && HAS(invited, from) ->
        invited = invited & ~BIT(from);
        if
        :: mt == ACCEPT -> accepted = accepted | BIT(from)
        :: else -> skip
        fi;
        if
        :: invited == 0 -> finish_formation()
        :: else -> skip
        fi
    :: !(PH == INITIATING && mg == gid) && mt == ACCEPT ->
        send(from, ABORT, mg, 0, 0)     /* not forming that group: let the invitee go */
    :: else -> skip     /* a stale decline, or a second reply */
    fi
}

/* ---- all-reduce (spec/group.md section 4) ---- */

inline on_shard() {
    if
    :: !HAS(members, from) -> skip
#ifndef BUG_NO_GROUP_CHECK
    :: mg != gid -> skip        /* a shard of an aborted group still in flight */
#endif
    :: else ->
        vt = mb | (mg != gid -> FOREIGN : 0);
        if
        :: ma != MYIDX || HAS(shfrom, from) -> abort_run()   /* malformed */
        :: else ->
            shfrom = shfrom | BIT(from);
            combine(shacc, vt);
            make_progress()
        fi
    fi
}

inline on_rshard() {
    if
    :: !HAS(members, from) -> skip
#ifndef BUG_NO_GROUP_CHECK
    :: mg != gid -> skip
#endif
    :: else ->
        vt = mb | (mg != gid -> FOREIGN : 0);
        if
        :: ma != RANK(from, members) || HAS(rfrom, ma) -> abort_run()   /* malformed */
        :: else ->
            reduced[ma] = vt;
            rfrom = rfrom | BIT(ma);
            make_progress()
        fi
    fi
}

inline refuse_start() {
    /* tell the members of that group, so they abort now rather than at their deadline */
    send_all(ma, ABORT, mg, 0, 0)
}

inline on_start() {
    if
    :: PH != PENDING || mg != gid -> refuse_start()   /* also after the start timeout */
    :: else ->
        if
        :: from != initiator -> skip
        :: !HAS(ma, me) || POP(ma) < GMIN || POP(ma) > GMAX ->
            enter(READY);
            refuse_start()
        :: else ->
            members = ma;
            begin_run();
            /* replay the shards that overtook the start */
            ve = 0;
            do
            :: ve < nearly && PH == RUNNING ->
                from = early_f[ve];
                ma = early_a[ve];
                mb = early_b[ve];
                mg = gid;
                if
                :: early_r[ve] -> on_rshard()
                :: else -> on_shard()
                fi;
                ve++
            :: else -> break
            od;
            nearly = 0
        fi
    fi
}

/* ---- abort (spec/group.md section 6) ---- */

inline on_abort() {
    if
    :: PH == INITIATING && mg == gid ->
        /* an invitee withdrew before the start */
        accepted = accepted & ~BIT(from);
        invited = invited & ~BIT(from);
        if
        :: invited == 0 -> finish_formation()
        :: else -> skip
        fi
    :: PH == PENDING && mg == gid -> enter(READY)
    :: PH == RUNNING && mg == gid && HAS(members, from) -> abort_run()  /* forwarded */
    :: else -> skip
    fi
}

inline handle() {
    if
    :: mt == INVITE -> on_invite()
    :: mt == ACCEPT || mt == DECLINE -> on_reply()
    :: mt == START -> on_start()       /* in every phase: refused unless pending for it */
    :: mt == ABORT -> on_abort()
    :: mt == SHARD || mt == RSHARD ->
        if
        :: PH == PENDING && mg == gid ->
            if
            :: nearly < EARLY ->
                early_r[nearly] = (mt == RSHARD);
                early_f[nearly] = from;
                early_a[nearly] = ma;
                early_b[nearly] = mb;
                nearly++
            :: else -> skip
            fi
        :: PH == RUNNING && mt == SHARD -> on_shard()
        :: PH == RUNNING && mt == RSHARD -> on_rshard()
        :: else -> skip
        fi
    fi
}

inline peer_lost() {
    vi = 0;
    do
    :: vi < N && !(HAS(deadset, vi) && !HAS(lost, vi)) -> vi++
    :: else -> break
    od;
    lost = lost | BIT(vi);
    if
#ifndef BUG_NO_ABORT_ON_LOSS
    :: PH == RUNNING && HAS(members, vi) -> abort_run()
#endif
    :: PH == INITIATING ->
        invited = invited & ~BIT(vi);
        accepted = accepted & ~BIT(vi)
    :: PH == PENDING && initiator == vi -> enter(READY)
    :: else -> skip
    fi
}

/* receive the next message, from any node whose channel to me is not empty */
#define INBOX(s) len(link[(s) * N + me])
#if N > 3
#define ANY_MAIL (INBOX(0) + INBOX(1) + INBOX(2) + INBOX(3) > 0)
#else
#define ANY_MAIL (INBOX(0) + INBOX(1) + INBOX(2) > 0)
#endif

inline receive() {
    if
    :: INBOX(0) > 0 -> from = 0
    :: INBOX(1) > 0 -> from = 1
    :: INBOX(2) > 0 -> from = 2
#if N > 3
    :: INBOX(3) > 0 -> from = 3
#endif
    fi;
    link[from * N + me]?mt, mg, ma, mb;
    if
    :: HAS(lost, from) -> skip         /* after the channel closed: never delivered */
    :: HAS(deadset, from) -> skip      /* in flight when the sender crashed: lost ... */
    :: else -> handle()                /* ... or delivered */
    fi
}

/* a deadline: any time, or with PROGRESS only when nothing else can happen */
#ifdef PROGRESS
#define DEADLINE(cond) :: atomic { (cond) && timeout ->
#else
#define DEADLINE(cond) :: atomic { (cond) ->
#endif

proctype Node(byte me) {
    byte gid, prio, initiator, invited, accepted, members;
    byte shfrom, shacc, rfrom, tries, lost, nearly;
    byte reduced[GMAX];
    bool early_r[EARLY];
    byte early_f[EARLY], early_a[EARLY], early_b[EARLY];

    PH = READY;
end:
    do
    :: atomic { ANY_MAIL -> receive() }
    :: atomic { PH == READY && me < NINIT && tries < TRIES && CAN_INVITE -> initiate() }
    DEADLINE(PH == INITIATING) finish_formation() }    /* invite_timeout */
#ifndef BUG_NO_START_TIMEOUT
    DEADLINE(PH == PENDING) enter(READY) }                /* invite + start timeout */
#endif
#ifndef BUG_NO_ABORT_ON_LOSS
    DEADLINE(PH == RUNNING) abort_run() }               /* allreduce_timeout */
#endif
    :: atomic { PH != DEAD && (deadset & ~lost & ~BIT(me)) != 0 -> peer_lost() }
    :: atomic { crashes < MAXCRASH && (PH == INITIATING || PH == PENDING || PH == RUNNING) ->
        crashes++;
        deadset = deadset | BIT(me);
        enter(DEAD);
        goto crashed }
    :: atomic { withdrawals < MAXWITHDRAW && PH != IDLE && PH != DEAD ->
        withdrawals++;
        if
        :: PH == INITIATING -> cancel_formation()
        :: PH == PENDING -> send(initiator, ABORT, gid, 0, 0)
        :: PH == RUNNING -> abort_run()
        :: else -> skip
        fi;
        enter(IDLE) }
    od;
crashed:
    skip
}

#ifndef PROGRESS
/* every wait has a deadline: when nothing at all can happen, nobody is left waiting */
active proctype Watchdog() {
end:
    timeout ->
    assert(QUIET(0) && QUIET(1) && QUIET(2)
#if N > 3
           && QUIET(3)
#endif
    )
}
#endif

init {
    atomic {
        vi = 0;
        do
        :: vi < N -> weight[vi] = vi + 1; vi++
        :: else -> break
        od;
        run Node(0);
        run Node(1);
        run Node(2);
#if N > 3
        run Node(3)
#endif
    }
}

#ifdef PROGRESS
/* one initiator, no faults: every invited member completes the group */
ltl all_complete { <> (ncompleted == GMAX) }
#endif
