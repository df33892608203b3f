/*
 * The policy's shared dictionary: strings and numbers with an optional time to live, owned by C
 * so that it survives a reload (the Lua states come and go; this stays with the mg_policy_t).
 *
 * A chained hash table keyed by arbitrary bytes. It is bounded twice, by entries and by bytes
 * (keys plus string values); when a change would pass either bound, expired entries are dropped
 * first, and only then does the change fail. Expired entries are otherwise dropped lazily, when
 * a lookup meets them.
 */
#include "policy_int.h"

#include "moongate/error.h"

#include <math.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

typedef struct dict_entry dict_entry_t;

struct dict_entry {
    dict_entry_t *next;
    uint64_t hash;
    uint64_t expires; /* ms since the epoch; 0 means never */
    mg_dict_type_t type;
    double num;
    char *str;
    size_t slen;
    size_t klen;
    char key[];
};

struct mg_dict {
    dict_entry_t **buckets;
    size_t nbuckets; /* a power of two */
    size_t entries;
    size_t bytes;
    size_t max_entries;
    size_t max_bytes;
    uint64_t seed;
    uint64_t last_purge; /* when a purge last freed nothing, so a full table is not rescanned
                            on every insert within the same millisecond */
};

/*
 * FNV-1a with a random seed and a final mix. The keys are often derived from what clients send
 * (user ids, addresses), and the seed keeps their bucket choice unpredictable.
 */
static uint64_t dict_hash(const mg_dict_t *d, const char *key, size_t klen)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ d->seed;
    for (size_t i = 0; i < klen; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

int mg__dict_new(size_t max_entries, size_t max_bytes, mg_dict_t **out)
{
    *out = NULL;
    if (max_entries == 0 || max_bytes == 0)
        return MG_EINVAL;
    mg_dict_t *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return MG_ENOMEM;
    d->nbuckets = 64;
    d->buckets = calloc(d->nbuckets, sizeof(*d->buckets));
    if (d->buckets == NULL) {
        free(d);
        return MG_ENOMEM;
    }
    d->max_entries = max_entries;
    d->max_bytes = max_bytes;
    if (RAND_bytes((unsigned char *)&d->seed, sizeof(d->seed)) != 1)
        d->seed = (uint64_t)(uintptr_t)d ^ 0x9e3779b97f4a7c15ULL;
    *out = d;
    return 0;
}

static void entry_free(dict_entry_t *e)
{
    free(e->str);
    free(e);
}

void mg__dict_free(mg_dict_t *d)
{
    if (d == NULL)
        return;
    for (size_t i = 0; i < d->nbuckets; i++) {
        dict_entry_t *e = d->buckets[i];
        while (e != NULL) {
            dict_entry_t *next = e->next;
            entry_free(e);
            e = next;
        }
    }
    free(d->buckets);
    free(d);
}

static void entry_unlink(mg_dict_t *d, dict_entry_t **link)
{
    dict_entry_t *e = *link;
    *link = e->next;
    d->entries--;
    d->bytes -= e->klen + e->slen;
    entry_free(e);
}

static bool expired(const dict_entry_t *e, uint64_t now)
{
    return e->expires != 0 && e->expires <= now;
}

/* Returns the link that points at key's entry (dropping it if expired), or NULL. */
static dict_entry_t **entry_find(mg_dict_t *d, const char *key, size_t klen, uint64_t hash,
                                 uint64_t now)
{
    dict_entry_t **link = &d->buckets[hash & (d->nbuckets - 1)];
    while (*link != NULL) {
        dict_entry_t *e = *link;
        if (e->hash == hash && e->klen == klen && memcmp(e->key, key, klen) == 0) {
            if (expired(e, now)) {
                entry_unlink(d, link);
                return NULL;
            }
            return link;
        }
        link = &e->next;
    }
    return NULL;
}

static size_t purge_expired(mg_dict_t *d, uint64_t now)
{
    size_t freed = 0;
    for (size_t i = 0; i < d->nbuckets; i++) {
        dict_entry_t **link = &d->buckets[i];
        while (*link != NULL) {
            if (expired(*link, now)) {
                entry_unlink(d, link);
                freed++;
            } else {
                link = &(*link)->next;
            }
        }
    }
    return freed;
}

/* Makes room for one more entry of add_bytes, or says there is none. */
static bool room_for(mg_dict_t *d, size_t add_entries, size_t add_bytes, uint64_t now)
{
    if (d->entries + add_entries <= d->max_entries && d->bytes + add_bytes <= d->max_bytes)
        return true;
    if (d->last_purge != now) {
        if (purge_expired(d, now) == 0)
            d->last_purge = now;
    }
    return d->entries + add_entries <= d->max_entries && d->bytes + add_bytes <= d->max_bytes;
}

/* Doubles the table when it averages more than one entry per bucket. Failure is harmless. */
static void maybe_grow(mg_dict_t *d)
{
    if (d->entries <= d->nbuckets)
        return;
    size_t n = d->nbuckets * 2;
    dict_entry_t **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return;
    for (size_t i = 0; i < d->nbuckets; i++) {
        dict_entry_t *e = d->buckets[i];
        while (e != NULL) {
            dict_entry_t *next = e->next;
            e->next = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
            e = next;
        }
    }
    free(d->buckets);
    d->buckets = b;
    d->nbuckets = n;
}

bool mg__dict_get(mg_dict_t *d, const char *key, size_t klen, uint64_t now, mg_dict_value_t *out)
{
    if (klen == 0 || klen > MG_DICT_KEY_MAX)
        return false;
    dict_entry_t **link = entry_find(d, key, klen, dict_hash(d, key, klen), now);
    if (link == NULL)
        return false;
    dict_entry_t *e = *link;
    out->type = e->type;
    out->num = e->num;
    out->str = e->str;
    out->len = e->slen;
    return true;
}

static dict_entry_t *entry_new(mg_dict_t *d, const char *key, size_t klen, uint64_t hash)
{
    dict_entry_t *e = calloc(1, sizeof(*e) + klen);
    if (e == NULL)
        return NULL;
    memcpy(e->key, key, klen);
    e->klen = klen;
    e->hash = hash;
    dict_entry_t **head = &d->buckets[hash & (d->nbuckets - 1)];
    e->next = *head;
    *head = e;
    d->entries++;
    d->bytes += klen;
    return e;
}

int mg__dict_set(mg_dict_t *d, const char *key, size_t klen, const mg_dict_value_t *v,
                 uint64_t ttl_ms, uint64_t now)
{
    if (klen == 0 || klen > MG_DICT_KEY_MAX)
        return MG_EINVAL;
    uint64_t hash = dict_hash(d, key, klen);
    dict_entry_t **link = entry_find(d, key, klen, hash, now);
    if (v == NULL) {
        if (link != NULL)
            entry_unlink(d, link);
        return 0;
    }

    size_t new_slen = v->type == MG_DICT_STRING ? v->len : 0;
    char *copy = NULL;
    if (v->type == MG_DICT_STRING) {
        copy = malloc(new_slen + 1);
        if (copy == NULL)
            return MG_ENOMEM;
        memcpy(copy, v->str, new_slen);
        copy[new_slen] = '\0';
    }

    dict_entry_t *e = link != NULL ? *link : NULL;
    size_t old_bytes = e != NULL ? e->slen : 0;
    size_t add_bytes = (e == NULL ? klen : 0) + (new_slen > old_bytes ? new_slen - old_bytes : 0);
    if (!room_for(d, e == NULL ? 1 : 0, add_bytes, now)) {
        free(copy);
        return MG_ENOMEM;
    }
    if (e == NULL) {
        /* room_for() may have purged, but never key's own entry: it was live. */
        e = entry_new(d, key, klen, hash);
        if (e == NULL) {
            free(copy);
            return MG_ENOMEM;
        }
    }
    d->bytes -= e->slen;
    free(e->str);
    e->str = copy; /* transferred */
    e->slen = new_slen;
    d->bytes += new_slen;
    e->type = v->type;
    e->num = v->type == MG_DICT_NUMBER ? v->num : 0;
    e->expires = ttl_ms != 0 ? now + ttl_ms : 0;
    maybe_grow(d);
    return 0;
}

int mg__dict_incr(mg_dict_t *d, const char *key, size_t klen, double by, uint64_t ttl_ms,
                  uint64_t now, double *out)
{
    if (klen == 0 || klen > MG_DICT_KEY_MAX)
        return MG_EINVAL;
    uint64_t hash = dict_hash(d, key, klen);
    dict_entry_t **link = entry_find(d, key, klen, hash, now);
    dict_entry_t *e;
    if (link != NULL) {
        e = *link;
        if (e->type != MG_DICT_NUMBER)
            return MG_EINVAL;
    } else {
        if (!room_for(d, 1, klen, now))
            return MG_ENOMEM;
        e = entry_new(d, key, klen, hash);
        if (e == NULL)
            return MG_ENOMEM;
        e->type = MG_DICT_NUMBER;
        e->expires = ttl_ms != 0 ? now + ttl_ms : 0;
        maybe_grow(d);
    }
    e->num += by;
    *out = e->num;
    return 0;
}

int mg__dict_take_bucket(mg_dict_t *d, const char *key, size_t klen, double n, double interval,
                         double burst, double now_s, uint64_t now_ms, bool *allowed,
                         double *value)
{
    mg_dict_value_t v;
    double full_at = now_s;
    if (mg__dict_get(d, key, klen, now_ms, &v)) {
        if (v.type != MG_DICT_NUMBER)
            return MG_EINVAL;
        if (v.num > now_s)
            full_at = v.num;
    }
    double new_full_at = full_at + n * interval;
    double over = new_full_at - now_s - burst * interval;
    if (over > interval * 0.01) {
        *allowed = false;
        *value = over;
        return 0;
    }
    double ttl = ceil((new_full_at - now_s) * 1000);
    mg_dict_value_t nv = { .type = MG_DICT_NUMBER, .num = new_full_at };
    int rc = mg__dict_set(d, key, klen, &nv, ttl < 1 ? 1 : (uint64_t)ttl, now_ms);
    if (rc != 0)
        return rc;
    *allowed = true;
    *value = new_full_at;
    return 0;
}

int64_t mg__dict_ttl(mg_dict_t *d, const char *key, size_t klen, uint64_t now)
{
    if (klen == 0 || klen > MG_DICT_KEY_MAX)
        return -2;
    dict_entry_t **link = entry_find(d, key, klen, dict_hash(d, key, klen), now);
    if (link == NULL)
        return -2;
    return (*link)->expires == 0 ? -1 : (int64_t)((*link)->expires - now);
}

void mg__dict_usage(const mg_dict_t *d, size_t *entries, size_t *bytes, size_t *max_entries,
                    size_t *max_bytes)
{
    *entries = d->entries;
    *bytes = d->bytes;
    *max_entries = d->max_entries;
    *max_bytes = d->max_bytes;
}
