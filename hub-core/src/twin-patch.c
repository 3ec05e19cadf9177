/* SPDX-License-Identifier: MIT */
/* Twin documents as pure functions over json_t (reference §6.2, §6.3, §6.4): the limits,
 * merge patches, replacement and `$metadata`. No store, no clock: the caller hands in the
 * time stamp. Fuzzed by tests/fuzz/fuzz-twin-patch.c, so every walk over a document that may
 * come from outside is bounded by the depth limit (HUB_TWIN_DEPTH_MAX): the checks stop one
 * level below it, and patches are checked before they are merged, so no recursion here goes
 * deeper than HUB_TWIN_DEPTH_MAX + 1 levels into untrusted input. */

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "hub/json-dump.h"
#include "hub/twin.h"

static const char *const section_names[_HUB_TWIN_SECTION_MAX] = {
        [HUB_TWIN_SECTION_TAGS] = "tags",
        [HUB_TWIN_SECTION_DESIRED] = "properties.desired",
        [HUB_TWIN_SECTION_REPORTED] = "properties.reported",
};

static const size_t section_limits[_HUB_TWIN_SECTION_MAX] = {
        [HUB_TWIN_SECTION_TAGS] = HUB_TWIN_TAGS_MAX,
        [HUB_TWIN_SECTION_DESIRED] = HUB_TWIN_DESIRED_MAX,
        [HUB_TWIN_SECTION_REPORTED] = HUB_TWIN_REPORTED_MAX,
};

const char *hub_twin_section_name(enum hub_twin_section which) {
        if ((unsigned) which >= _HUB_TWIN_SECTION_MAX)
                return NULL;
        return section_names[which];
}

size_t hub_twin_section_limit(enum hub_twin_section which) {
        if ((unsigned) which >= _HUB_TWIN_SECTION_MAX)
                return 0;
        return section_limits[which];
}

static bool is_system_key(const char *key) {
        return streq(key, "$version") || streq(key, "$metadata");
}

/* ---- paths for error messages ------------------------------------------------------------ */

#define PATH_COMPONENT_MAX 64 /* longer keys are shortened in messages */

struct path {
        char buf[400];
        size_t len;
};

static void path_init(struct path *p, const char *root) {
        int n = snprintf(p->buf, sizeof p->buf, "%s", root ? root : "");
        p->len = n < 0 ? 0 : MIN((size_t) n, sizeof p->buf - 1);
}

/* Appends ".key" (or "[i]" when key is NULL); returns the length to restore with path_pop().
 * Long keys are cut at a UTF-8 character boundary and marked with "..."; when the buffer is
 * full the path just stops growing (the message stays valid UTF-8). */
static size_t path_push(struct path *p, const char *key, size_t index) {
        size_t old = p->len, room = sizeof p->buf - 1 - p->len;
        char comp[PATH_COMPONENT_MAX + 8];
        size_t n;

        if (key) {
                n = strlen(key);
                if (n > PATH_COMPONENT_MAX) {
                        n = PATH_COMPONENT_MAX;
                        while (n > 0 && ((unsigned char) key[n] & 0xC0) == 0x80)
                                n--; /* do not cut a multi-byte character */
                        (void) snprintf(comp, sizeof comp, ".%.*s...", (int) n, key);
                } else
                        (void) snprintf(comp, sizeof comp, ".%s", key);
                if (old == 0)
                        memmove(comp, comp + 1, strlen(comp)); /* no leading dot at the root */
        } else
                (void) snprintf(comp, sizeof comp, "[%zu]", index);
        n = strlen(comp);
        if (n <= room) {
                memcpy(p->buf + p->len, comp, n);
                p->len += n;
                p->buf[p->len] = '\0';
        }
        return old;
}

static void path_pop(struct path *p, size_t old) {
        p->len = old;
        p->buf[old] = '\0';
}

_printf_(4, 5) static int fail(char *errbuf, size_t errbuf_size, int err, const char *fmt, ...) {
        va_list ap;

        if (errbuf && errbuf_size > 0) {
                va_start(ap, fmt);
                (void) vsnprintf(errbuf, errbuf_size, fmt, ap);
                va_end(ap);
        }
        return err;
}

/* ---- key and value rules ------------------------------------------------------------------ */

struct walk {
        bool patch; /* checking a patch: null values allowed (deletions), no sizes */
        struct path path;
        char *errbuf;
        size_t errbuf_size;
};

static const char *where(const struct walk *w) {
        return w->path.len > 0 ? w->path.buf : "(document)";
}

static int check_key(struct walk *w, const char *key) {
        size_t n = strlen(key);

        if (n == 0)
                return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: empty key", where(w));
        if (n > HUB_TWIN_KEY_MAX)
                return fail(w->errbuf, w->errbuf_size, -E2BIG, "%s: key of %zu bytes exceeds the limit of %u bytes",
                            where(w), n, HUB_TWIN_KEY_MAX);
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) key[i];
                if (c < 0x20 || c == 0x7F || (c == 0xC2 && i + 1 < n && (unsigned char) key[i + 1] >= 0x80 &&
                                              (unsigned char) key[i + 1] <= 0x9F))
                        return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: key contains a control character",
                                    where(w));
                if (c == '.')
                        return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: key contains '.'", where(w));
                if (c == ' ')
                        return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: key contains a space", where(w));
                if (c == '$')
                        return fail(w->errbuf, w->errbuf_size, -EINVAL,
                                    i == 0 ? "%s: keys starting with '$' are reserved" : "%s: key contains '$'",
                                    where(w));
        }
        return 0;
}

static int check_object(struct walk *w, const json_t *obj, unsigned level, bool top);

/* v is the value at w->path; level is the level of its container. */
static int check_value(struct walk *w, const json_t *v, unsigned level) {
        switch (json_typeof(v)) {
        case JSON_OBJECT:
        case JSON_ARRAY:
                if (level + 1 > HUB_TWIN_DEPTH_MAX)
                        return fail(w->errbuf, w->errbuf_size, -E2BIG,
                                    "%s: nesting deeper than %u levels", where(w), HUB_TWIN_DEPTH_MAX);
                if (json_is_object(v))
                        return check_object(w, v, level + 1, false);
                for (size_t i = 0; i < json_array_size(v); i++) {
                        const json_t *e = json_array_get(v, i);
                        size_t old = path_push(&w->path, NULL, i);
                        int r = json_is_null(e) ? 0 : check_value(w, e, level + 1);
                        path_pop(&w->path, old);
                        if (r < 0)
                                return r;
                }
                return 0;
        case JSON_STRING:
                if (json_string_length(v) > HUB_TWIN_STRING_MAX)
                        return fail(w->errbuf, w->errbuf_size, -E2BIG,
                                    "%s: string of %zu bytes exceeds the limit of %u bytes", where(w),
                                    json_string_length(v), HUB_TWIN_STRING_MAX);
                return 0;
        case JSON_INTEGER:
                if (json_integer_value(v) > HUB_TWIN_INT_MAX || json_integer_value(v) < HUB_TWIN_INT_MIN)
                        return fail(w->errbuf, w->errbuf_size, -EINVAL,
                                    "%s: integer %" JSON_INTEGER_FORMAT " outside %" PRId64 " .. %" PRId64,
                                    where(w), json_integer_value(v), HUB_TWIN_INT_MIN, HUB_TWIN_INT_MAX);
                return 0;
        case JSON_REAL:
        case JSON_TRUE:
        case JSON_FALSE:
                return 0;
        case JSON_NULL:
                if (w->patch)
                        return 0;
                return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: null value in a stored section", where(w));
        }
        return fail(w->errbuf, w->errbuf_size, -EINVAL, "%s: unknown JSON type", where(w));
}

static int check_object(struct walk *w, const json_t *obj, unsigned level, bool top) {
        const char *key;
        json_t *v;

        json_object_foreach ((json_t *) obj, key, v) {
                size_t old;
                int r;

                if (top && w->patch && is_system_key(key))
                        continue; /* ignored, see hub_twin_patch_apply() */
                old = path_push(&w->path, key, 0);
                r = check_key(w, key);
                if (r >= 0)
                        r = check_value(w, v, level);
                path_pop(&w->path, old);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- size (§6.2) -------------------------------------------------------------------------- */

static size_t string_size(const json_t *s) {
        const unsigned char *p = (const unsigned char *) json_string_value(s);
        size_t n = json_string_length(s), size = 0;

        for (size_t i = 0; i < n; i++) {
                if (p[i] < 0x20 || p[i] == 0x7F)
                        continue;
                if (p[i] == 0xC2 && i + 1 < n && p[i + 1] >= 0x80 && p[i + 1] <= 0x9F) {
                        i++; /* C1 control character, two bytes */
                        continue;
                }
                size++;
        }
        return size;
}

static size_t value_size(const json_t *v, unsigned level);

static size_t add_size(size_t a, size_t b) {
        return a > SIZE_MAX - b ? SIZE_MAX : a + b;
}

static size_t object_size(const json_t *obj, unsigned level, bool top) {
        const char *key;
        json_t *v;
        size_t size = 0;

        json_object_foreach ((json_t *) obj, key, v) {
                if (top && is_system_key(key))
                        continue;
                size = add_size(size, strlen(key));
                size = add_size(size, value_size(v, level));
        }
        return size;
}

static size_t value_size(const json_t *v, unsigned level) {
        size_t size = 0;

        switch (json_typeof(v)) {
        case JSON_OBJECT:
                if (level + 1 > HUB_TWIN_DEPTH_MAX + 1)
                        return SIZE_MAX;
                return object_size(v, level + 1, false);
        case JSON_ARRAY:
                if (level + 1 > HUB_TWIN_DEPTH_MAX + 1)
                        return SIZE_MAX;
                for (size_t i = 0; i < json_array_size(v); i++)
                        size = add_size(size, value_size(json_array_get(v, i), level + 1));
                return size;
        case JSON_STRING:
                return string_size(v);
        case JSON_INTEGER:
        case JSON_REAL:
                return 8;
        case JSON_TRUE:
        case JSON_FALSE:
        case JSON_NULL:
                return 4;
        }
        return SIZE_MAX;
}

size_t hub_twin_section_size(const json_t *section) {
        if (!json_is_object(section))
                return SIZE_MAX;
        return object_size(section, 0, true);
}

int hub_twin_check_limits(const json_t *section, enum hub_twin_section which, char *errbuf, size_t errbuf_size) {
        struct walk w = { .patch = false, .errbuf = errbuf, .errbuf_size = errbuf_size };
        size_t size, limit, json_size;
        int r;

        if ((unsigned) which >= _HUB_TWIN_SECTION_MAX)
                return fail(errbuf, errbuf_size, -EINVAL, "invalid twin section");
        if (!json_is_object(section))
                return fail(errbuf, errbuf_size, -EINVAL, "%s: not a JSON object", section_names[which]);
        path_init(&w.path, section_names[which]);
        r = check_object(&w, section, 0, true);
        if (r < 0)
                return r;

        limit = section_limits[which];
        size = hub_twin_section_size(section);
        if (size > limit)
                return fail(errbuf, errbuf_size, -E2BIG, "%s: size %zu bytes exceeds the limit of %zu bytes",
                            section_names[which], size, limit);
        /* Local safeguard: §6.2 counts control characters and empty containers as nothing. */
        json_size = hub_json_dumpb(section, NULL, 0, JSON_COMPACT);
        if (json_size == 0 || json_size > 2 * limit)
                return fail(errbuf, errbuf_size, -E2BIG,
                            "%s: JSON encoding of %zu bytes exceeds the limit of %zu bytes", section_names[which],
                            json_size, 2 * limit);
        return 0;
}

int hub_twin_check_patch(const json_t *patch, enum hub_twin_section which, char *errbuf, size_t errbuf_size) {
        struct walk w = { .patch = true, .errbuf = errbuf, .errbuf_size = errbuf_size };

        if ((unsigned) which >= _HUB_TWIN_SECTION_MAX)
                return fail(errbuf, errbuf_size, -EINVAL, "invalid twin section");
        if (!json_is_object(patch))
                return fail(errbuf, errbuf_size, -EINVAL, "%s: must be a JSON object", section_names[which]);
        path_init(&w.path, section_names[which]);
        return check_object(&w, patch, 0, true);
}

/* ---- $metadata ---------------------------------------------------------------------------- */

static int meta_stamp(json_t *node, const struct hub_twin_stamp *st) {
        if (json_object_set_new(node, "$lastUpdated", json_string(st->time)) < 0)
                return -ENOMEM;
        if (st->version > 0 && json_object_set_new(node, "$lastUpdatedVersion", json_integer(st->version)) < 0)
                return -ENOMEM;
        return 0;
}

static json_t *meta_node_new(const struct hub_twin_stamp *st) {
        json_t *n = json_object();

        if (n && meta_stamp(n, st) < 0)
                n = (json_decref(n), NULL);
        return n;
}

/* Fresh metadata for a whole (checked) value: objects get a node per key, recursively. */
static json_t *meta_fresh(const json_t *v, const struct hub_twin_stamp *st) {
        json_t *n = meta_node_new(st), *child;
        const char *key;
        json_t *cv;

        if (!n || !json_is_object(v))
                return n;
        json_object_foreach ((json_t *) v, key, cv) {
                child = meta_fresh(cv, st);
                if (!child || json_object_set_new(n, key, child) < 0) {
                        json_decref(n);
                        return NULL;
                }
        }
        return n;
}

/* ---- merge -------------------------------------------------------------------------------- */

/* Merges a checked patch into target; meta (may be NULL) is target's metadata node. */
static int merge(json_t *target, json_t *meta, const json_t *patch, const struct hub_twin_stamp *st, bool top) {
        const char *key;
        json_t *val;
        int r;

        json_object_foreach ((json_t *) patch, key, val) {
                if (top && is_system_key(key))
                        continue;
                if (json_is_null(val)) {
                        (void) json_object_del(target, key); /* deleting a missing key is fine */
                        if (meta)
                                (void) json_object_del(meta, key);
                        continue;
                }
                if (json_is_object(val)) {
                        json_t *cur = json_object_get(target, key), *mchild = NULL;

                        if (!json_is_object(cur)) {
                                cur = json_object();
                                if (!cur || json_object_set_new(target, key, cur) < 0)
                                        return -ENOMEM;
                                if (meta) {
                                        mchild = meta_node_new(st);
                                        if (!mchild || json_object_set_new(meta, key, mchild) < 0)
                                                return -ENOMEM;
                                }
                        } else if (meta) {
                                mchild = json_object_get(meta, key);
                                if (!json_is_object(mchild)) {
                                        mchild = meta_fresh(cur, st);
                                        if (!mchild || json_object_set_new(meta, key, mchild) < 0)
                                                return -ENOMEM;
                                }
                        }
                        r = merge(cur, mchild, val, st, false);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (json_object_set_new(target, key, json_deep_copy(val)) < 0)
                        return -ENOMEM;
                if (meta && json_object_set_new(meta, key, meta_node_new(st)) < 0)
                        return -ENOMEM;
        }
        if (meta)
                return meta_stamp(meta, st);
        return 0;
}

/* Replaces the content of dst by that of src (both objects), keeping dst's identity. */
static int swap_in(json_t *dst, json_t *src) {
        if (json_object_clear(dst) < 0 || json_object_update(dst, src) < 0)
                return -ENOMEM;
        return 0;
}

static int apply_common(json_t *section, json_t *meta, json_t *new_s, json_t *new_m, enum hub_twin_section which,
                        char *errbuf, size_t errbuf_size) {
        int r = hub_twin_check_limits(new_s, which, errbuf, errbuf_size);
        if (r < 0)
                return r;
        /* Nothing can fail below except allocation inside jansson's update, which only
         * happens on a hash table resize; do the metadata first, then the section. */
        if (meta && (r = swap_in(meta, new_m)) < 0)
                return r;
        if ((r = swap_in(section, new_s)) < 0)
                return r;
        if (errbuf && errbuf_size > 0)
                errbuf[0] = '\0';
        return 0;
}

static int args_valid(const json_t *section, const json_t *meta, const json_t *patch, enum hub_twin_section which,
                      const struct hub_twin_stamp *st) {
        return json_is_object(section) && (!meta || json_is_object(meta)) && patch && st && st->time &&
               (unsigned) which < _HUB_TWIN_SECTION_MAX;
}

int hub_twin_patch_apply(json_t *section, json_t *meta, const json_t *patch, enum hub_twin_section which,
                         const struct hub_twin_stamp *stamp, char *errbuf, size_t errbuf_size) {
        json_t *new_s = NULL, *new_m = NULL;
        int r;

        if (!args_valid(section, meta, patch, which, stamp))
                return fail(errbuf, errbuf_size, -EINVAL, "invalid arguments");
        r = hub_twin_check_patch(patch, which, errbuf, errbuf_size);
        if (r < 0)
                return r;
        new_s = json_deep_copy(section);
        if (meta)
                new_m = json_deep_copy(meta);
        if (!new_s || (meta && !new_m)) {
                r = fail(errbuf, errbuf_size, -ENOMEM, "out of memory");
                goto out;
        }
        r = merge(new_s, new_m, patch, stamp, true);
        if (r < 0) {
                r = fail(errbuf, errbuf_size, r, "out of memory");
                goto out;
        }
        r = apply_common(section, meta, new_s, new_m, which, errbuf, errbuf_size);
out:
        json_decref(new_s);
        json_decref(new_m);
        return r;
}

/* Metadata of a replaced (checked) section: unchanged values keep theirs. */
static json_t *replace_meta(const json_t *old, const json_t *old_meta, const json_t *new_v,
                            const struct hub_twin_stamp *st) {
        json_t *n = meta_node_new(st), *child, *cv;
        const char *key;

        if (!n)
                return NULL;
        json_object_foreach ((json_t *) new_v, key, cv) {
                const json_t *ov = json_is_object(old) ? json_object_get(old, key) : NULL;
                const json_t *om = json_is_object(old_meta) ? json_object_get(old_meta, key) : NULL;

                if (ov && json_is_object(om) && json_equal(ov, cv))
                        child = json_deep_copy(om);
                else if (json_is_object(ov) && json_is_object(cv))
                        child = replace_meta(ov, om, cv, st);
                else
                        child = meta_fresh(cv, st);
                if (!child || json_object_set_new(n, key, child) < 0) {
                        json_decref(n);
                        return NULL;
                }
        }
        return n;
}

int hub_twin_replace_apply(json_t *section, json_t *meta, const json_t *doc, enum hub_twin_section which,
                           const struct hub_twin_stamp *stamp, char *errbuf, size_t errbuf_size) {
        json_t *new_s = NULL, *new_m = NULL;
        int r;

        if (!args_valid(section, meta, doc, which, stamp))
                return fail(errbuf, errbuf_size, -EINVAL, "invalid arguments");
        r = hub_twin_check_patch(doc, which, errbuf, errbuf_size);
        if (r < 0)
                return r;
        new_s = json_object();
        if (!new_s) {
                r = fail(errbuf, errbuf_size, -ENOMEM, "out of memory");
                goto out;
        }
        r = merge(new_s, NULL, doc, stamp, true);
        if (r < 0) {
                r = fail(errbuf, errbuf_size, r, "out of memory");
                goto out;
        }
        /* Check before building metadata: replace_meta() walks new_s recursively. */
        r = hub_twin_check_limits(new_s, which, errbuf, errbuf_size);
        if (r < 0)
                goto out;
        if (meta) {
                new_m = replace_meta(section, meta, new_s, stamp);
                if (!new_m) {
                        r = fail(errbuf, errbuf_size, -ENOMEM, "out of memory");
                        goto out;
                }
        }
        r = apply_common(section, meta, new_s, new_m, which, errbuf, errbuf_size);
out:
        json_decref(new_s);
        json_decref(new_m);
        return r;
}

static json_t *meta_restrict(const json_t *meta, const json_t *patch, bool top, unsigned level) {
        json_t *n = json_object(), *v, *pv;
        const char *key;

        if (!n)
                return NULL;
        json_object_foreach ((json_t *) meta, key, v) {
                if (key[0] == '$' && json_object_set(n, key, v) < 0)
                        goto fail;
        }
        if (!json_is_object(patch))
                return n;
        json_object_foreach ((json_t *) patch, key, pv) {
                json_t *m, *child;

                if ((top && is_system_key(key)) || json_is_null(pv))
                        continue;
                m = json_object_get(meta, key);
                if (!json_is_object(m))
                        continue;
                if (json_is_object(pv) && level < HUB_TWIN_DEPTH_MAX + 1)
                        child = meta_restrict(m, pv, false, level + 1);
                else
                        child = json_deep_copy(m);
                if (!child || json_object_set_new(n, key, child) < 0)
                        goto fail;
        }
        return n;
fail:
        json_decref(n);
        return NULL;
}

json_t *hub_twin_meta_restrict(const json_t *meta, const json_t *patch) {
        if (!json_is_object(meta))
                return json_object();
        return meta_restrict(meta, patch, true, 0);
}
